"""Wire contracts of gradserve: the generated protobuf/gRPC modules (``gradserve.proto.v1``) and the
one tensor codec that turns numpy arrays into ``Tensor`` messages and back.

The ``.proto`` sources live in ``proto/v1/``; regenerate the Python modules with ``make proto``.
"""
