"""COCO AP gathered from ranks: no duplicate or lost image when N is not divisible by the world size."""

from __future__ import annotations

import json

import pytest
import torch

from piip6b.tasks.data import CocoInstanceDataset, InferenceSampler, PadCollate, ShapesSpec, write_shapes_dataset
from piip6b.tasks.evaluation import CocoEvaluator, evaluate_detection
from piip6b.testing import run_ranks

NUM_VAL = 5  # not divisible by 2: rank 1's last sample is padding


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = write_shapes_dataset(tmp_path_factory.mktemp("coco_eval") / "shapes",
                                ShapesSpec(num_train=1, num_val=NUM_VAL, min_size=64, max_size=96, seed=3))
    return root / "coco/val2017", root / "coco/annotations/instances_val2017.json"


def _perfect(sample, score=1.0):
    target = sample["target"]
    n = len(target["boxes"])
    return target["boxes"], torch.full((n,), score), target["labels"], target["masks"]


def _rank_evaluators(dataset, world, gather_for_rank0):
    """One evaluator per simulated rank; rank 0's gather returns every rank's results (only rank 0
    evaluates)."""
    coco = dataset.coco_api()
    return [CocoEvaluator(coco, dataset.label_to_category_id, gather=gather_for_rank0) for _ in range(world)]


def test_perfect_predictions_score_100_box_and_mask_ap(val_set):
    dataset = CocoInstanceDataset(*val_set, train=False)
    evaluator = CocoEvaluator(dataset.coco_api(), dataset.label_to_category_id)
    for i in range(len(dataset)):
        sample = dataset[i]
        evaluator.add(sample["image_id"], *_perfect(sample))
    result = evaluator.evaluate().metrics
    assert result["bbox/AP"] == pytest.approx(100.0) and result["segm/AP"] == pytest.approx(100.0)
    assert result["num_images"] == NUM_VAL and result["missing_images"] == 0


def test_gather_dedupes_padding_and_reports_lost_images(val_set):
    dataset = CocoInstanceDataset(*val_set, train=False)
    world = 2
    evaluators = _rank_evaluators(dataset, world, lambda obj: [e._results for e in evaluators])
    for rank, evaluator in enumerate(evaluators):
        for index in InferenceSampler(len(dataset), world, rank):
            sample = dataset[index]
            boxes, scores, labels, masks = _perfect(sample)
            if sample["is_padding"]:
                # A padded duplicate that survived the merge (kept instead, or added to the real
                # copy) would bring confident wrong boxes and masks and lower the AP.
                boxes, scores, masks = boxes + 7.0, scores + 1.0, masks.roll(7, dims=-1)
            evaluator.add(sample["image_id"], boxes, scores, labels, masks)
    result = evaluators[0].evaluate().metrics  # rank 0 evaluates what it gathered
    assert result["num_images"] == NUM_VAL and result["bbox/AP"] == pytest.approx(100.0)

    lost_id = dataset.image_ids[1]  # rank 1 loses its first image
    del evaluators[1]._results[lost_id]
    result = evaluators[0].evaluate().metrics
    assert result["num_images"] == NUM_VAL - 1 and result["missing_images"] == 1


def test_no_detections_at_all_gives_zero_not_a_crash(val_set):
    dataset = CocoInstanceDataset(*val_set, train=False)
    evaluator = CocoEvaluator(dataset.coco_api(), dataset.label_to_category_id)
    evaluator.add(dataset.image_ids[0], torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 5, 5))
    result = evaluator.evaluate()
    assert result.metrics["bbox/AP"] == 0.0 and result.metrics["segm/AP"] == 0.0
    # COCOeval still runs: a size or category without ground truth stays "not applicable", not 0
    assert result.metrics["bbox/APl"] is None and result.metrics["segm/APl"] is None
    # only image 0 was evaluated: its classes score 0, the others have nothing to score
    assert set(result.per_class["bbox/AP"].values()) == {0.0, None}


def test_per_class_ap_by_name_and_not_applicable_sizes(val_set):
    dataset = CocoInstanceDataset(*val_set, train=False)
    coco = dataset.coco_api()
    evaluator = CocoEvaluator(coco, dataset.label_to_category_id)
    for i in range(len(dataset)):
        sample = dataset[i]
        boxes, scores, labels, masks = _perfect(sample)
        keep = labels != 1  # miss every object of the first class
        evaluator.add(sample["image_id"], boxes[keep], scores[keep], labels[keep], masks[keep])
    result = evaluator.evaluate()
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert list(result.per_class) == ["bbox/AP", "segm/AP"]
    for iou_type in ("bbox", "segm"):
        per_class = result.per_class[f"{iou_type}/AP"]
        assert list(per_class) == names  # the data set's names, in its order
        assert per_class[names[0]] == 0.0
        assert all(per_class[name] == pytest.approx(100.0) for name in names[1:])
        assert result.metrics[f"{iou_type}/AP"] == pytest.approx(200.0 / 3)  # the mean over the classes
        # The shapes are 20-80 px in images of at most 96 px: there is no large object to score.
        assert result.metrics[f"{iou_type}/APl"] is None
    assert "| class | bbox/AP | segm/AP |" in result.class_table(markdown=True)
    assert result.class_table().splitlines()[1].split() == [names[0], "0.00", "0.00"]


def test_predictions_file_is_coco_results_that_reproduce_the_ap(val_set, tmp_path):
    from pycocotools.cocoeval import COCOeval

    dataset = CocoInstanceDataset(*val_set, train=False)
    coco = dataset.coco_api()
    out = tmp_path / "nested" / "predictions.json"
    evaluator = CocoEvaluator(coco, dataset.label_to_category_id, predictions_file=out)
    for i in range(len(dataset)):
        sample = dataset[i]
        boxes, scores, labels, masks = _perfect(sample, score=0.9)
        evaluator.add(sample["image_id"], boxes + (i % 2) * 3.0, scores, labels, masks)  # some boxes off
    result = evaluator.evaluate()
    predictions = json.loads(out.read_text())
    assert {p["image_id"] for p in predictions} == set(dataset.image_ids)
    assert all({"image_id", "category_id", "bbox", "score", "segmentation"} <= set(p) for p in predictions)
    for iou_type in ("bbox", "segm"):  # what COCO's own tools make of the file
        scored = COCOeval(coco, coco.loadRes(str(out)), iou_type)
        scored.evaluate()
        scored.accumulate()
        scored.summarize()
        assert 100.0 * scored.stats[0] == pytest.approx(result.metrics[f"{iou_type}/AP"])


def _distributed_worker(image_dir: str, ann_file: str) -> dict:
    from piip6b import dist
    from piip6b.engine import distributed
    from piip6b.tasks.evaluation import SegmentationMetric, slide_inference

    env = distributed.init_distributed()
    rank, world = env.rank, env.world_size
    try:
        dataset = CocoInstanceDataset(image_dir, ann_file, train=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=InferenceSampler(len(dataset), world, rank),
                                             collate_fn=PadCollate(32))
        batches = []

        def predict(batch):  # ground truth as predictions, cut back to each image's true size
            batches.append(len(batch["image_ids"]))
            return [
                {"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"],
                 "masks": t["masks"][:, :h, :w]}
                for t, (h, w) in zip(batch["targets"], batch["image_sizes"])
            ]

        coco = dataset.coco_api()
        result = evaluate_detection(predict, loader, CocoEvaluator(coco, dataset.label_to_category_id))

        metric = SegmentationMetric(3)
        metric.update(torch.tensor([rank, 1]), torch.tensor([rank, 2]))  # rank 0: gt 0->0, 2->1; rank 1: 1->1, 2->1
        metric.all_reduce()

        calls = []

        def segment(x):  # a collective in every forward, as ZeRO-3's parameter gathers are
            calls.append(dist.all_sum_(torch.ones(3)).tolist())
            return x[:, :2]

        size = (96, 96) if rank == 0 else (32, 32)  # rank 0 needs 4 windows, rank 1 one
        slide_inference(segment, torch.zeros(1, 3, 96, 96), [size], 2, crop=(64, 64), stride=(32, 32))

        # Rank 0 evaluates; if that fails, every rank must get the error instead of waiting for the
        # numbers until the collective timeout.
        failing = CocoEvaluator(coco, dataset.label_to_category_id)
        if rank == 0:
            failing.add(10**9, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 1))
        try:
            failing.evaluate()
            error = None
        except Exception as exc:  # noqa: BLE001 - what each rank saw is the result
            error = {"type": type(exc).__name__, "message": str(exc), "elsewhere": dist.raised_elsewhere(exc)}
        return {"coco": result.to_json(), "confusion": metric.confusion.tolist(), "batches": batches,
                "slide_forwards": calls, "error": error}
    finally:
        distributed.teardown()


@pytest.fixture(scope="module")
def two_ranks(val_set):
    return run_ranks(_distributed_worker, *map(str, val_set), nproc=2, timeout=120).check()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_gloo_ranks_gather_every_image_once_and_agree(two_ranks):
    results = two_ranks
    assert results[0]["coco"] == results[1]["coco"]  # every rank returns rank 0's numbers
    assert results[0]["coco"]["num_images"] == NUM_VAL and results[0]["coco"]["missing_images"] == 0
    assert results[0]["coco"]["bbox/AP"] == pytest.approx(100.0) and results[0]["coco"]["segm/AP"] == pytest.approx(100.0)
    assert results[0]["batches"] == [2, 1] and results[1]["batches"] == [2, 1]  # same batch count on both ranks
    assert results[0]["confusion"] == results[1]["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 2, 0]]
    # Rank 1 pads with dummy forwards, and every forward's collective met the other rank's.
    assert results[0]["slide_forwards"] == results[1]["slide_forwards"] == [[2.0, 2.0, 2.0]] * 4


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_an_error_on_rank0_reaches_the_other_ranks(two_ranks):
    """Rank 0 evaluates; if that fails, rank 1 gets the same error (marked as raised on rank 0's
    behalf) instead of waiting for the numbers until the collective timeout."""
    for rank, result in enumerate(two_ranks):
        assert result["error"]["type"] == "ValueError" and "not in the ground truth" in result["error"]["message"]
        assert result["error"]["elsewhere"] == (rank == 1)
