"""What the paper trained: reference encoders, fusion heads, datasets and training scripts."""
