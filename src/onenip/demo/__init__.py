"""The demo: a procedural dataset of textured product types with synthetic defects, and `onenip demo`, which
trains and tests a small model on it. The dataset also serves the test suite, which needs no outside data."""
