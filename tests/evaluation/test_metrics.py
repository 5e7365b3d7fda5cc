"""DreamBench score math against hand-computed values (tolerance 1e-12: float64 cosines)."""

import math

import pytest
import torch

from pipeline.evaluation.metrics import (
    cosine_matrix,
    image_similarity,
    mean_pairwise_cosine,
    summarize_scores,
    text_similarity,
)

TOL = 1e-12


def test_cosine_matrix_of_known_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]])
    expected = torch.tensor(
        [
            [0.0, 1.0, -1.0],
            [math.sqrt(0.5), math.sqrt(0.5), -math.sqrt(0.5)],
            [0.0, 0.0, 0.0],  # a zero vector is dissimilar to everything, not NaN
        ],
        dtype=torch.float64,
    )
    got = cosine_matrix(a, b)
    assert got.dtype == torch.float64 and got.shape == (3, 3)
    assert torch.allclose(got, expected, atol=TOL, rtol=0)


def test_identical_features_score_one_and_scale_does_not_matter():
    features = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert mean_pairwise_cosine(features[:1], features[:1]) == pytest.approx(1.0, abs=TOL)
    assert mean_pairwise_cosine(features[:1], 3.5 * features[:1]) == pytest.approx(1.0, abs=TOL)
    assert text_similarity(features, 2 * features).tolist() == pytest.approx([1.0] * 5, abs=TOL)


def test_mean_pairwise_cosine_is_the_mean_over_all_pairs():
    generated = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    real = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    # Pairs: (1, sqrt(.5), 0) for the first image, (0, sqrt(.5), -1) for the second.
    per_image = [(1 + math.sqrt(0.5) + 0) / 3, (0 + math.sqrt(0.5) - 1) / 3]
    assert image_similarity(generated, real).tolist() == pytest.approx(per_image, abs=TOL)
    assert mean_pairwise_cosine(generated, real) == pytest.approx(sum(per_image) / 2, abs=TOL)


def test_text_similarity_pairs_rows_one_to_one():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    texts = torch.tensor([[0.0, 1.0], [-2.0, -2.0], [4.0, 3.0]])
    assert text_similarity(images, texts).tolist() == pytest.approx([0.0, -1.0, 24 / 25], abs=TOL)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        cosine_matrix(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="one shape"):
        text_similarity(torch.zeros(2, 3), torch.zeros(3, 3))


def test_summarize_scores_means_per_subject_then_over_subjects():
    rows = [
        {"subject_id": "dog", "dino": 0.5, "clip_i": 0.8, "clip_t": 0.2},
        {"subject_id": "dog", "dino": 0.7, "clip_i": 0.6, "clip_t": 0.4},
        {"subject_id": "vase", "dino": 0.1, "clip_i": 0.2, "clip_t": 0.3},
    ]
    per_subject, overall = summarize_scores(rows)
    assert list(per_subject) == ["dog", "vase"]
    assert per_subject["dog"] == pytest.approx({"dino": 0.6, "clip_i": 0.7, "clip_t": 0.3}, abs=TOL)
    # Each subject counts once: (0.6 + 0.1) / 2, not (0.5 + 0.7 + 0.1) / 3.
    assert overall == pytest.approx({"dino": 0.35, "clip_i": 0.45, "clip_t": 0.3}, abs=TOL)
    with pytest.raises(ValueError, match="no scored images"):
        summarize_scores([])
