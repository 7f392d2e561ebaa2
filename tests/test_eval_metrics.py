"""Zero-shot classifier/metrics and retrieval recall against independent references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from ds_linclip.data.pipeline import DataError
from ds_linclip.data.prompts import load_classnames, load_templates
from ds_linclip.eval.errors import EvalError
from ds_linclip.eval.retrieval import retrieval_recall
from ds_linclip.eval.zeroshot import ZeroShotMetrics, build_classifier, run_zeroshot


# ----------------------------------------------------------------------------- class names, templates


def test_builtin_classnames_and_templates_come_from_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    names = load_classnames("imagenet1k")
    assert len(names) == 1000 and names == list(IMAGENET_CLASSNAMES) and names[0] == "tench"
    assert len(load_templates("openai")) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(load_templates("simple")) == len(SIMPLE_IMAGENET_TEMPLATES) == 7
    assert len(load_classnames("fashion_mnist")) == 10


def test_class_file_reads_names_in_order_and_rejects_duplicates(tmp_path):
    good = tmp_path / "classes.txt"
    good.write_text("cat\n\n dog \nsea lion\n")
    assert load_classnames(str(good)) == ["cat", "dog", "sea lion"]

    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\nbird\ndog\n")
    with pytest.raises(DataError, match=r"'cat' \(lines 1 and 3\).*'dog' \(lines 2 and 5\)"):
        load_classnames(str(dup))
    with pytest.raises(DataError, match="class names file not found.*imagenet21k.txt"):
        load_classnames(str(tmp_path / "imagenet21k.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="has no class names"):
        load_classnames(str(tmp_path / "empty.txt"))


def test_template_file_needs_placeholder(tmp_path):
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\na {{weird}} {} template\n")
    loaded = load_templates(str(templates))
    assert loaded == ["a photo of a {}.", "a {{weird}} {} template"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno placeholder here\n")
    with pytest.raises(DataError, match="line 2: 'no placeholder here'"):
        load_templates(str(bad))


# ----------------------------------------------------------------------------- classifier


class _BagOfTokens(torch.nn.Module):
    """A deterministic text encoder: mean of token embeddings (no training, no mocks of our code)."""

    def __init__(self, vocab: int = 64, dim: int = 16):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens).mean(dim=1)


def _char_tokenizer(texts, context=24):
    out = torch.zeros(len(texts), context, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [ord(c) % 64 for c in text][:context]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def test_classifier_is_mean_of_normalised_template_embeddings_in_any_batching():
    torch.manual_seed(0)
    encoder = _BagOfTokens()
    classnames = [f"class {i}" for i in range(7)]
    templates = ["a photo of a {}.", "a {} in the wild", lambda c: f"art of the {c}"]
    # the definition, one class at a time
    expected = []
    for name in classnames:
        texts = [t(name) if callable(t) else t.format(name) for t in templates]
        mean = F.normalize(encoder(_char_tokenizer(texts)), dim=-1).mean(dim=0)
        expected.append(mean / mean.norm())
    expected = torch.stack(expected, dim=1)
    for texts_per_batch in (1, 3, 7, 1000):
        weights = build_classifier(encoder, _char_tokenizer, classnames, templates, texts_per_batch, progress=False)
        assert weights.shape == (16, 7)
        torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(weights.norm(dim=0), torch.ones(7))


# ----------------------------------------------------------------------------- metrics


def test_metrics_match_sklearn_on_random_logits():
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    torch.manual_seed(1)
    num_classes, n = 12, 500
    labels = torch.randint(0, num_classes, (n,))
    logits = torch.randn(n, num_classes) + 1.5 * F.one_hot(labels, num_classes)
    metrics = ZeroShotMetrics(num_classes)
    predictions = torch.cat([metrics.update(logits[i : i + 64], labels[i : i + 64]) for i in range(0, n, 64)])
    result = metrics.compute()
    assert torch.equal(predictions, logits.argmax(dim=1))
    assert result["top1"] == pytest.approx(top_k_accuracy_score(labels, logits, k=1, labels=range(num_classes)))
    assert result["top5"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(num_classes)))
    assert result["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert 0.2 < result["top1"] < result["top5"] < 1.0


def test_metrics_with_fewer_than_five_classes_and_bad_labels():
    metrics = ZeroShotMetrics(3)
    metrics.update(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]))
    result = metrics.compute()
    assert result == {"top1": 0.5, "top5": 1.0, "mean_per_class_recall": 0.5}  # classes 1 (1/1) and 2 (0/1)
    with pytest.raises(EvalError, match="label 7 at sample 3 is outside the 3 class names"):
        metrics.update(torch.zeros(2, 3), torch.tensor([0, 7]))
    with pytest.raises(EvalError, match="no samples"):
        ZeroShotMetrics(3).compute()


def test_run_zeroshot_counts_every_sample_and_rejects_empty_data():
    torch.manual_seed(2)
    classifier = F.normalize(torch.randn(8, 4), dim=0)  # (D, C)
    images = torch.randn(10, 8)
    labels = (images @ classifier).argmax(dim=1)
    batches = [(images[i : i + 3], labels[i : i + 3]) for i in range(0, 10, 3)]
    metrics, predictions = run_zeroshot(lambda x: x, classifier, batches, progress=False)
    assert metrics["top1"] == 1.0 and len(predictions) == 10
    metrics, predictions = run_zeroshot(lambda x: x, classifier, batches, max_samples=5, progress=False)
    assert len(predictions) == 5
    with pytest.raises(EvalError, match="yielded no samples"):
        run_zeroshot(lambda x: x, classifier, [], progress=False)
    with pytest.raises(EvalError, match="NaN"):
        run_zeroshot(lambda x: x * float("nan"), classifier, batches, progress=False)


# ----------------------------------------------------------------------------- retrieval


def _reference_recall(image_features, text_features, text_to_image, ks=(1, 5, 10)):
    """Full similarity matrix + topk: the obvious way, for comparison."""
    scores = image_features @ text_features.T
    out = {}
    for k in ks:
        top_texts = scores.topk(min(k, scores.shape[1]), dim=1).indices
        hit = (text_to_image[top_texts] == torch.arange(len(image_features))[:, None]).any(dim=1)
        out[f"image_to_text_R@{k}"] = hit.double().mean().item()
    for k in ks:
        top_images = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        hit = (top_images == text_to_image[:, None]).any(dim=1)
        out[f"text_to_image_R@{k}"] = hit.double().mean().item()
    return out


def test_identical_pairs_have_recall_one():
    torch.manual_seed(3)
    features = F.normalize(torch.randn(300, 32), dim=-1)
    metrics = retrieval_recall(features, features.clone(), chunk_size=64)
    assert set(metrics.values()) == {1.0} and len(metrics) == 6


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked_and_reference(chunk_size):
    torch.manual_seed(4)
    n, d = 257, 16
    images = F.normalize(torch.randn(n, d), dim=-1)
    texts = F.normalize(images + 0.9 * torch.randn(n, d), dim=-1)  # noisy pairs: recalls strictly between 0 and 1
    unchunked = retrieval_recall(images, texts, chunk_size=n)
    chunked = retrieval_recall(images, texts, chunk_size=chunk_size)
    assert chunked == unchunked
    reference = _reference_recall(images, texts, torch.arange(n))
    assert unchunked == pytest.approx(reference, abs=1e-12)
    assert 0.0 < unchunked["image_to_text_R@1"] < unchunked["image_to_text_R@5"] < unchunked["image_to_text_R@10"] < 1.0


def test_several_captions_per_image():
    torch.manual_seed(5)
    n_images, per_image, d = 40, 3, 16
    images = F.normalize(torch.randn(n_images, d), dim=-1)
    text_to_image = torch.arange(n_images).repeat_interleave(per_image)
    texts = F.normalize(images[text_to_image] + 0.8 * torch.randn(n_images * per_image, d), dim=-1)
    metrics = retrieval_recall(images, texts, text_to_image, chunk_size=9)
    assert metrics == pytest.approx(_reference_recall(images, texts, text_to_image), abs=1e-12)


def test_retrieval_input_errors():
    features = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(EvalError, match="4 images but 3 captions"):
        retrieval_recall(features, features[:3])
    with pytest.raises(EvalError, match="at least one image"):
        retrieval_recall(features[:0], features[:0])
    with pytest.raises(EvalError, match="NaN"):
        retrieval_recall(features * float("nan"), features)
    with pytest.raises(EvalError, match="every image needs at least one caption"):
        retrieval_recall(features, features, torch.tensor([0, 0, 1, 1]))
