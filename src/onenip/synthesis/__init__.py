"""Anomaly synthesis for the restoration stream and the refiner: per image (`per_image`, the reference) and batched
on the training device (`batched`), with the colour-space and pixel operations they share."""
