"""OneNIP: unified anomaly detection with one normal image prompt."""
