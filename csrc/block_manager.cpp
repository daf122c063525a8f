// switchkd._C.BlockManager: host-side bookkeeping of a paged KV cache.
//
// A pool of `num_blocks` blocks of `block_size` token slots is shared by sequences; each sequence
// owns an ordered list of blocks and a length. Slot s of block b is the flat pool index
// b * block_size + s. The manager only does accounting: the KV tensors live in Python.
// Every operation either succeeds or raises and leaves the state unchanged.

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

namespace {

struct Sequence {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size) : num_blocks_(num_blocks), block_size_(block_size) {
    TORCH_CHECK_VALUE(num_blocks > 0 && num_blocks <= INT32_MAX, "num_blocks must be in [1, 2^31), got ", num_blocks);
    TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
    free_.reserve(num_blocks);
    for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));  // pop gives 0, 1, ...
  }

  // Registers a new, empty sequence.
  void add(int64_t seq_id) {
    TORCH_CHECK_VALUE(!seqs_.count(seq_id), "sequence ", seq_id, " is already registered");
    seqs_.emplace(seq_id, Sequence{});
  }

  // Makes room for `n` more tokens of one sequence without changing its length.
  void reserve(int64_t seq_id, int64_t n) {
    TORCH_CHECK_VALUE(n >= 0, "reserve: n must be >= 0, got ", n);
    Sequence& seq = get(seq_id);
    int64_t need = blocks_for(seq.length + n) - static_cast<int64_t>(seq.blocks.size());
    check_free(std::max<int64_t>(need, 0));
    grow(seq, seq.length + n);
  }

  // Appends counts[i] tokens to sequence ids[i]; returns the int64 slots of the new tokens, sequence
  // by sequence ([sum(counts)]).
  torch::Tensor append(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) {
    TORCH_CHECK_VALUE(ids.size() == counts.size(), "append: got ", ids.size(), " ids but ", counts.size(), " counts");
    check_unique(ids, "append");
    int64_t need = 0, total = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      TORCH_CHECK_VALUE(counts[i] >= 0, "append: counts must be >= 0, got ", counts[i], " for sequence ", ids[i]);
      const Sequence& seq = get(ids[i]);
      need += std::max<int64_t>(blocks_for(seq.length + counts[i]) - static_cast<int64_t>(seq.blocks.size()), 0);
      total += counts[i];
    }
    check_free(need);
    torch::Tensor slots = torch::empty({total}, torch::kInt64);
    int64_t* out = slots.data_ptr<int64_t>();
    for (size_t i = 0; i < ids.size(); ++i) {
      Sequence& seq = seqs_.at(ids[i]);
      grow(seq, seq.length + counts[i]);
      for (int64_t p = seq.length; p < seq.length + counts[i]; ++p) *out++ = slot(seq, p);
      seq.length += counts[i];
    }
    return slots;
  }

  // One forward's metadata in a single call: appends counts[i] tokens to ids[i] (inputs right-padded to
  // max(counts) per sequence) and returns (slots [n], rows [n], positions [B, q], block_table [B, W]
  // int64 with padding 0, lengths [B], mask [B, 1, q, W * block_size] bool). rows index the real tokens
  // in the flattened [B * q] inputs; pads repeat the last position and are never written; query i of
  // sequence b attends to keys j < len_b with j <= len_b - count_b + i (bottom-right causal).
  std::vector<torch::Tensor> prepare(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) {
    TORCH_CHECK_VALUE(!ids.empty(), "prepare: no sequences");
    int64_t width = *std::max_element(counts.begin(), counts.end());
    TORCH_CHECK_VALUE(width > 0, "prepare: every forward needs at least one new token");
    const int64_t batch = static_cast<int64_t>(ids.size());
    std::vector<int64_t> starts(batch);
    for (int64_t b = 0; b < batch; ++b) starts[b] = get(ids[b]).length;
    torch::Tensor slots = append(ids, counts);
    torch::Tensor rows = torch::empty({slots.numel()}, torch::kInt64);
    torch::Tensor positions = torch::empty({batch, width}, torch::kInt64);
    torch::Tensor lengths = torch::empty({batch}, torch::kInt64);
    int64_t* row_out = rows.data_ptr<int64_t>();
    int64_t* pos_out = positions.data_ptr<int64_t>();
    size_t table_width = 0;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < counts[b]; ++i) *row_out++ = b * width + i;
      for (int64_t i = 0; i < width; ++i) pos_out[b * width + i] = starts[b] + std::min(i, counts[b] - 1);
      lengths.data_ptr<int64_t>()[b] = starts[b] + counts[b];
      table_width = std::max(table_width, seqs_.at(ids[b]).blocks.size());
    }
    const int64_t keys = static_cast<int64_t>(table_width) * block_size_;
    torch::Tensor table = torch::zeros({batch, static_cast<int64_t>(table_width)}, torch::kInt64);
    torch::Tensor mask = torch::zeros({batch, 1, width, keys}, torch::kBool);
    int64_t* table_out = table.data_ptr<int64_t>();
    bool* mask_out = mask.data_ptr<bool>();
    for (int64_t b = 0; b < batch; ++b) {
      const auto& blocks = seqs_.at(ids[b]).blocks;
      std::copy(blocks.begin(), blocks.end(), table_out + b * table_width);
      const int64_t length = starts[b] + counts[b];
      for (int64_t i = 0; i < width; ++i) {
        const int64_t last = std::min(length - 1, length - counts[b] + i);
        std::fill(mask_out + (b * width + i) * keys, mask_out + (b * width + i) * keys + last + 1, true);
      }
    }
    return {slots, rows, positions, table, lengths, mask};
  }

  // Rolls a sequence back to `new_length` tokens, freeing the blocks past it.
  void truncate(int64_t seq_id, int64_t new_length) {
    Sequence& seq = get(seq_id);
    TORCH_CHECK_VALUE(new_length >= 0 && new_length <= seq.length, "truncate: sequence ", seq_id, " has length ",
                      seq.length, ", cannot truncate to ", new_length);
    seq.length = new_length;
    size_t keep = static_cast<size_t>(blocks_for(new_length));
    while (seq.blocks.size() > keep) {
      free_.push_back(seq.blocks.back());
      seq.blocks.pop_back();
    }
  }

  // Batched rollback: truncate(ids[i], new_lengths[i]) for every i, validated before any change.
  void truncate_many(const std::vector<int64_t>& ids, const std::vector<int64_t>& new_lengths) {
    TORCH_CHECK_VALUE(ids.size() == new_lengths.size(), "truncate: got ", ids.size(), " ids but ",
                      new_lengths.size(), " lengths");
    check_unique(ids, "truncate");
    for (size_t i = 0; i < ids.size(); ++i) {
      const Sequence& seq = get(ids[i]);
      TORCH_CHECK_VALUE(new_lengths[i] >= 0 && new_lengths[i] <= seq.length, "truncate: sequence ", ids[i],
                        " has length ", seq.length, ", cannot truncate to ", new_lengths[i]);
    }
    for (size_t i = 0; i < ids.size(); ++i) truncate(ids[i], new_lengths[i]);
  }

  // Returns every block of a sequence and forgets it.
  void free(int64_t seq_id) {
    Sequence& seq = get(seq_id);
    free_.insert(free_.end(), seq.blocks.rbegin(), seq.blocks.rend());
    seqs_.erase(seq_id);
  }

  // int32 [B, max_blocks] block ids of each sequence, padded with -1.
  torch::Tensor block_table(const std::vector<int64_t>& ids) const {
    size_t width = 0;
    for (int64_t id : ids) width = std::max(width, get(id).blocks.size());
    torch::Tensor table = torch::full({static_cast<int64_t>(ids.size()), static_cast<int64_t>(width)}, -1,
                                      torch::kInt32);
    int32_t* out = table.data_ptr<int32_t>();
    for (size_t i = 0; i < ids.size(); ++i) {
      const auto& blocks = get(ids[i]).blocks;
      std::copy(blocks.begin(), blocks.end(), out + i * width);
    }
    return table;
  }

  // int64 [B, n] slots of positions starts[i] .. starts[i] + n - 1 of each sequence (within its blocks).
  torch::Tensor slot_mapping(const std::vector<int64_t>& ids, const std::vector<int64_t>& starts, int64_t n) const {
    TORCH_CHECK_VALUE(ids.size() == starts.size(), "slot_mapping: got ", ids.size(), " ids but ", starts.size(),
                      " starts");
    TORCH_CHECK_VALUE(n >= 0, "slot_mapping: n must be >= 0, got ", n);
    torch::Tensor slots = torch::empty({static_cast<int64_t>(ids.size()), n}, torch::kInt64);
    int64_t* out = slots.data_ptr<int64_t>();
    for (size_t i = 0; i < ids.size(); ++i) {
      const Sequence& seq = get(ids[i]);
      int64_t capacity = static_cast<int64_t>(seq.blocks.size()) * block_size_;
      TORCH_CHECK_VALUE(starts[i] >= 0 && starts[i] + n <= capacity, "slot_mapping: positions [", starts[i], ", ",
                        starts[i] + n, ") of sequence ", ids[i], " are outside its ", capacity, " reserved slots");
      for (int64_t p = starts[i]; p < starts[i] + n; ++p) *out++ = slot(seq, p);
    }
    return slots;
  }

  torch::Tensor lengths(const std::vector<int64_t>& ids) const {
    torch::Tensor out = torch::empty({static_cast<int64_t>(ids.size())}, torch::kInt64);
    for (size_t i = 0; i < ids.size(); ++i) out.data_ptr<int64_t>()[i] = get(ids[i]).length;
    return out;
  }

  int64_t length(int64_t seq_id) const { return get(seq_id).length; }
  std::vector<int32_t> blocks(int64_t seq_id) const { return get(seq_id).blocks; }
  bool contains(int64_t seq_id) const { return seqs_.count(seq_id) > 0; }
  std::vector<int64_t> sequence_ids() const {
    std::vector<int64_t> ids;
    for (const auto& kv : seqs_) ids.push_back(kv.first);
    std::sort(ids.begin(), ids.end());
    return ids;
  }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }

 private:
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }
  int64_t slot(const Sequence& seq, int64_t pos) const {
    return static_cast<int64_t>(seq.blocks[pos / block_size_]) * block_size_ + pos % block_size_;
  }

  Sequence& get(int64_t seq_id) {
    auto it = seqs_.find(seq_id);
    TORCH_CHECK_VALUE(it != seqs_.end(), "unknown sequence id ", seq_id);
    return it->second;
  }
  const Sequence& get(int64_t seq_id) const { return const_cast<BlockManager*>(this)->get(seq_id); }

  void check_free(int64_t need) const {
    TORCH_CHECK(need <= num_free_blocks(), "out of KV blocks: need ", need, " more, ", num_free_blocks(), " of ",
                num_blocks_, " free (block_size ", block_size_, ")");
  }

  static void check_unique(std::vector<int64_t> ids, const char* op) {
    std::sort(ids.begin(), ids.end());
    auto dup = std::adjacent_find(ids.begin(), ids.end());
    TORCH_CHECK_VALUE(dup == ids.end(), op, ": sequence ", (dup == ids.end() ? 0 : *dup), " is listed twice");
  }

  void grow(Sequence& seq, int64_t tokens) {
    while (static_cast<int64_t>(seq.blocks.size()) < blocks_for(tokens)) {
      seq.blocks.push_back(free_.back());
      free_.pop_back();
    }
  }

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> free_;
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "switchkd C++ extension: paged KV-cache block manager";
  pybind11::class_<BlockManager>(m, "BlockManager")
      .def(pybind11::init<int64_t, int64_t>(), pybind11::arg("num_blocks"), pybind11::arg("block_size"))
      .def("add", &BlockManager::add, pybind11::arg("seq_id"))
      .def("reserve", &BlockManager::reserve, pybind11::arg("seq_id"), pybind11::arg("n"))
      .def("append", &BlockManager::append, pybind11::arg("ids"), pybind11::arg("counts"))
      .def("prepare", &BlockManager::prepare, pybind11::arg("ids"), pybind11::arg("counts"))
      .def("truncate", &BlockManager::truncate, pybind11::arg("seq_id"), pybind11::arg("new_length"))
      .def("truncate", &BlockManager::truncate_many, pybind11::arg("ids"), pybind11::arg("new_lengths"))
      .def("free", &BlockManager::free, pybind11::arg("seq_id"))
      .def("block_table", &BlockManager::block_table, pybind11::arg("ids"))
      .def("slot_mapping", &BlockManager::slot_mapping, pybind11::arg("ids"), pybind11::arg("starts"),
           pybind11::arg("n"))
      .def("lengths", &BlockManager::lengths, pybind11::arg("ids"))
      .def("length", &BlockManager::length, pybind11::arg("seq_id"))
      .def("blocks", &BlockManager::blocks, pybind11::arg("seq_id"))
      .def("__contains__", &BlockManager::contains)
      .def("sequence_ids", &BlockManager::sequence_ids)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
      .def_property_readonly("num_sequences", &BlockManager::num_sequences)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size);
}
