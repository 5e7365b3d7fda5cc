"""DreamBench evaluation: DINO, CLIP-I and CLIP-T scores of a model (`subjectforge evaluate`).

benchmark (subjects, prompts, image names) -> plan (Ray Data: generate with workers.ImageGenerator,
score with workers.ImageScorer, whose math is metrics and features) -> report -> job.
"""
