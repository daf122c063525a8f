// switchkd._C.BlockManager: host-side block tables of a paged KV cache.
//
// A pool of `num_blocks` blocks of `block_size` token slots is shared by sequences; each sequence
// owns an ordered list of blocks and a length. Slot s of block b is the flat pool index
// b * block_size + s. The manager hands out blocks and, for each forward pass, builds its metadata
// (pool slots of the new tokens, position ids, block table) as numpy arrays it allocates and fills,
// which Python wraps without a copy (torch.from_numpy). The KV tensors themselves live in Python.
// Plain C++17 and pybind11: no dependency on torch's C++ ABI. Every operation either succeeds or
// raises (ValueError for bad arguments, RuntimeError when blocks run out) and leaves the state unchanged.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError.
#define CHECK_VALUE(cond, ...) \
  do {                         \
    if (!(cond)) throw std::invalid_argument(concat(__VA_ARGS__)); \
  } while (0)
#define CHECK_RUNTIME(cond, ...) \
  do {                           \
    if (!(cond)) throw std::runtime_error(concat(__VA_ARGS__)); \
  } while (0)

using Array = py::array_t<int64_t>;

struct Sequence {
  std::vector<int32_t> blocks;
  int64_t length = 0;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size) : num_blocks_(num_blocks), block_size_(block_size) {
    CHECK_VALUE(num_blocks > 0 && num_blocks <= INT32_MAX, "num_blocks must be in [1, 2^31), got ", num_blocks);
    CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
    free_.reserve(num_blocks);
    for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));  // pop gives 0, 1, ...
  }

  // Registers a new, empty sequence.
  void add(int64_t seq_id) {
    CHECK_VALUE(!seqs_.count(seq_id), "sequence ", seq_id, " is already registered");
    seqs_.emplace(seq_id, Sequence{});
  }

  // One forward's metadata: appends counts[b] tokens to sequence ids[b] (the inputs are right-padded to
  // q = max(counts) tokens per sequence) and returns int64 arrays
  //   slots [n]        pool slots of the n = sum(counts) real new tokens, sequence by sequence;
  //   rows [n]         their rows in the flattened [B * q] inputs (pads are never written);
  //   positions [B, q] position ids, pads repeating the last real position;
  //   table [B, W]     block ids, padded with pad_block; W = table_width, or the widest sequence if 0;
  //   lengths [B]      tokens cached per sequence, the new ones included.
  // A query at position p attends to the keys at positions <= p (bottom-right causal).
  py::tuple prepare(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts, int64_t table_width,
                    int64_t pad_block) {
    CHECK_VALUE(!ids.empty(), "prepare: no sequences");
    CHECK_VALUE(ids.size() == counts.size(), "prepare: got ", ids.size(), " ids but ", counts.size(), " counts");
    CHECK_VALUE(table_width >= 0, "prepare: table_width must be >= 0, got ", table_width);
    const int64_t width = *std::max_element(counts.begin(), counts.end());
    CHECK_VALUE(width > 0, "prepare: every forward needs at least one new token");
    const int64_t batch = static_cast<int64_t>(ids.size());
    std::vector<int64_t> starts(batch);
    for (int64_t b = 0; b < batch; ++b) starts[b] = get(ids[b]).length;
    Array slots = append(ids, counts, table_width);
    int64_t widest = 0;
    for (int64_t id : ids) widest = std::max<int64_t>(widest, seqs_.at(id).blocks.size());
    const int64_t cols = table_width ? table_width : widest;
    Array rows(slots.size()), positions({batch, width}), table({batch, cols}), lengths(batch);
    int64_t* row_out = rows.mutable_data();
    int64_t* pos_out = positions.mutable_data();
    int64_t* table_out = table.mutable_data();
    std::fill(table_out, table_out + batch * cols, pad_block);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < counts[b]; ++i) *row_out++ = b * width + i;
      for (int64_t i = 0; i < width; ++i) pos_out[b * width + i] = starts[b] + std::min(i, counts[b] - 1);
      lengths.mutable_data()[b] = starts[b] + counts[b];
      const auto& blocks = seqs_.at(ids[b]).blocks;
      std::copy(blocks.begin(), blocks.end(), table_out + b * cols);
    }
    return py::make_tuple(slots, rows, positions, table, lengths);
  }

  // Rolls sequences back (ids[b] to new_lengths[b] tokens), freeing whole blocks past the new lengths.
  // Every pair is validated before any change.
  void truncate(const std::vector<int64_t>& ids, const std::vector<int64_t>& new_lengths) {
    CHECK_VALUE(ids.size() == new_lengths.size(), "truncate: got ", ids.size(), " ids but ", new_lengths.size(),
                " lengths");
    check_unique(ids, "truncate");
    for (size_t i = 0; i < ids.size(); ++i) {
      const Sequence& seq = get(ids[i]);
      CHECK_VALUE(new_lengths[i] >= 0 && new_lengths[i] <= seq.length, "truncate: sequence ", ids[i],
                  " has length ", seq.length, ", cannot truncate to ", new_lengths[i]);
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      Sequence& seq = seqs_.at(ids[i]);
      seq.length = new_lengths[i];
      const size_t keep = static_cast<size_t>(blocks_for(seq.length));
      while (seq.blocks.size() > keep) {
        free_.push_back(seq.blocks.back());
        seq.blocks.pop_back();
      }
    }
  }

  // Returns every block of the sequences and forgets them (all ids are checked first).
  void free(const std::vector<int64_t>& ids) {
    check_unique(ids, "free");
    for (int64_t id : ids) get(id);
    for (int64_t id : ids) {
      const auto& blocks = seqs_.at(id).blocks;
      free_.insert(free_.end(), blocks.rbegin(), blocks.rend());
      seqs_.erase(id);
    }
  }

  int64_t num_used_blocks() const { return num_blocks_ - static_cast<int64_t>(free_.size()); }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }

 private:
  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

  Sequence& get(int64_t seq_id) {
    auto it = seqs_.find(seq_id);
    CHECK_VALUE(it != seqs_.end(), "unknown sequence id ", seq_id);
    return it->second;
  }

  static void check_unique(std::vector<int64_t> ids, const char* op) {
    std::sort(ids.begin(), ids.end());
    auto dup = std::adjacent_find(ids.begin(), ids.end());
    CHECK_VALUE(dup == ids.end(), op, ": sequence ", (dup == ids.end() ? 0 : *dup), " is listed twice");
  }

  // Grows each sequence by counts[b] tokens (all or nothing) and returns the slots of the new tokens.
  Array append(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts, int64_t table_width) {
    check_unique(ids, "prepare");
    int64_t need = 0, total = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      CHECK_VALUE(counts[i] >= 0, "prepare: counts must be >= 0, got ", counts[i], " for sequence ", ids[i]);
      const Sequence& seq = get(ids[i]);
      const int64_t blocks = blocks_for(seq.length + counts[i]);
      CHECK_VALUE(!table_width || blocks <= table_width, "prepare: sequence ", ids[i], " needs ", blocks,
                  " blocks, more than table_width ", table_width);
      need += std::max<int64_t>(blocks - static_cast<int64_t>(seq.blocks.size()), 0);
      total += counts[i];
    }
    CHECK_RUNTIME(need <= static_cast<int64_t>(free_.size()), "out of KV blocks: need ", need, " more, ",
                  free_.size(), " of ", num_blocks_, " free (block_size ", block_size_, ")");
    Array slots(total);
    int64_t* out = slots.mutable_data();
    for (size_t i = 0; i < ids.size(); ++i) {
      Sequence& seq = seqs_.at(ids[i]);
      while (static_cast<int64_t>(seq.blocks.size()) < blocks_for(seq.length + counts[i])) {
        seq.blocks.push_back(free_.back());
        free_.pop_back();
      }
      for (int64_t p = seq.length; p < seq.length + counts[i]; ++p) {
        *out++ = static_cast<int64_t>(seq.blocks[p / block_size_]) * block_size_ + p % block_size_;
      }
      seq.length += counts[i];
    }
    return slots;
  }

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> free_;
  std::unordered_map<int64_t, Sequence> seqs_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "switchkd C++ extension: paged KV-cache block manager";
  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("add", &BlockManager::add, py::arg("seq_id"))
      .def("prepare", &BlockManager::prepare, py::arg("ids"), py::arg("counts"), py::arg("table_width") = 0,
           py::arg("pad_block") = 0)
      .def("truncate", &BlockManager::truncate, py::arg("ids"), py::arg("new_lengths"))
      .def("free", &BlockManager::free, py::arg("ids"))
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
      .def_property_readonly("num_sequences", &BlockManager::num_sequences)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size);
}
