"""Static-shape decoding blocks, replayed from CUDA graphs on CUDA."""


class StaticDecoder:
    def __init__(self, pair):
        raise NotImplementedError
