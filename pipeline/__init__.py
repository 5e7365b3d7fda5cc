"""subjectforge: data and training pipeline for subject-driven text-to-image generation."""

__version__ = "0.1.0"
