"""Running a trained model on new images: the Python `Predictor`, `onenip predict`, and export to ONNX and
TorchScript."""
