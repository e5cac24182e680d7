"""How users reach gradserve: the model builder, ONNX import, the local engines, the gRPC client
library and the ``gradserve`` command line."""
