"""DreamBench scores as pure functions of feature vectors (DreamBooth, Ruiz et al., 2023, sec. 4.1).

- DINO: mean pairwise cosine similarity between the DINO ViT-S/16 CLS features of generated
  and real photos of the subject (subject fidelity; DINO's self-supervised features tell two
  dogs of one breed apart better than CLIP's).
- CLIP-I: the same with CLIP ViT-B/32 image embeddings.
- CLIP-T: cosine similarity between each generated image's CLIP embedding and its prompt's
  (prompt fidelity).

Every score is a plain cosine, in [-1, 1] (the papers report it unscaled, e.g. 0.594).
Cosines are taken in float64 so a score does not depend on the batch it was computed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

METRICS = ("dino", "clip_i", "clip_t")
_EPS = 1e-12  # a zero vector has cosine 0 with everything


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All cosines between rows: a (N, D), b (M, D) -> (N, M) float64 in [-1, 1]."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N, D) and (M, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = F.normalize(a.double(), dim=1, eps=_EPS)
    b = F.normalize(b.double(), dim=1, eps=_EPS)
    return (a @ b.T).clamp(-1.0, 1.0)


def image_similarity(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per generated image, its mean cosine to the M real photos: (N, D), (M, D) -> (N,) float64.

    DINO and CLIP-I of a subject are the mean of this over its generated images, which is the
    mean over all N x M (generated, real) pairs.
    """
    return cosine_matrix(generated, real).mean(dim=1)


def mean_pairwise_cosine(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO / CLIP-I of one subject: the mean cosine over all (generated, real) pairs."""
    return float(cosine_matrix(generated, real).mean())


def text_similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T per image: the cosine of row i of images (N, D) with row i of texts (N, D) -> (N,)
    float64 in [-1, 1]."""
    if images.shape != texts.shape or images.ndim != 2:
        raise ValueError(f"need two (N, D) arrays of one shape, got {tuple(images.shape)} and {tuple(texts.shape)}")
    return F.cosine_similarity(images.double(), texts.double(), dim=1, eps=_EPS).clamp(-1.0, 1.0)


def summarize_scores(
    rows: Iterable[Mapping[str, object]], metrics: tuple[str, ...] = METRICS
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per-image scores -> ({subject_id: {metric: mean}}, {metric: overall}).

    rows: one mapping per generated image with `subject_id` and a float per metric. A subject's
    score is the mean over its images; the overall score is the mean over subjects (each subject
    counts once, as in the papers; with the same images per subject it equals the mean over
    all images). Subjects keep the order in which they first appear.
    """
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        subject = str(row["subject_id"])
        acc = sums.setdefault(subject, dict.fromkeys(metrics, 0.0))
        for metric in metrics:
            acc[metric] += float(row[metric])  # type: ignore[arg-type]
        counts[subject] = counts.get(subject, 0) + 1
    if not sums:
        raise ValueError("no scored images to summarize")
    per_subject = {s: {m: acc[m] / counts[s] for m in metrics} for s, acc in sums.items()}
    overall = {m: sum(scores[m] for scores in per_subject.values()) / len(per_subject) for m in metrics}
    return per_subject, overall
