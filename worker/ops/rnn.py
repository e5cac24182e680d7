"""Recurrent layers: RNN, GRU and LSTM (ONNX semantics, opsets 13-21). (being written)"""
