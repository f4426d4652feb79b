"""Proposals json files (round trip, clear errors naming the file and the entry or image id) and their way
through a dataset: :class:`WithProposals` and the transforms map them like the boxes."""

import json

import numpy as np
import pytest
import torch

from detkit.data.coco import CocoDetection
from detkit.data.proposals import ProposalFileError, WithProposals, load_proposals, save_proposals
from detkit.data.transforms import Letterbox, TrainTransform
from tests.data.conftest import write_coco


def test_proposals_json_round_trip(tmp_path):
    proposals = {3: torch.tensor([[1.0, 2.0, 11.0, 22.0, 0.9], [0.0, 0.0, 5.0, 5.0, 0.1]]),
                 8: torch.tensor([[4.0, 4.0, 8.0, 9.0, 0.5]])}
    path = tmp_path / "proposals.json"
    save_proposals(path, proposals)
    assert json.loads(path.read_text())[0] == {"image_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0],
                                                 "score": pytest.approx(0.9)}
    loaded = load_proposals(path, with_scores=True)
    assert loaded.keys() == proposals.keys()
    assert all(torch.allclose(loaded[k], proposals[k]) for k in proposals)
    assert torch.allclose(load_proposals(path)[3], proposals[3][:, :4])


@pytest.mark.parametrize("content,message", [
    ("{not json", "is not valid JSON"),
    ('{"image_id": 1}', "must hold a list"),
    ('[{"image_id": 1, "bbox": [0, 0, 10, 10]}, {"image_id": 5, "bbox": [0, 0, -1, 4]}]',
     r"entry 1 \(image_id 5\) has bbox \[0, 0, -1, 4\] with zero or negative width"),
    ('[{"image_id": "a.jpg", "bbox": [0, 0, 1, 1]}]', "entry 0 has image_id 'a.jpg'; expected an integer"),
    ('[{"image_id": 2, "bbox": [0, 0, 1]}]', r"entry 0 \(image_id 2\) has bbox \[0, 0, 1\]; expected \[x, y, w, h\]"),
])
def test_bad_proposals_file_names_the_file_and_the_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProposalFileError, match=message) as info:
        load_proposals(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_proposals(tmp_path / "missing.json")


def test_dataset_delivers_proposals_mapped_like_the_boxes(tmp_path):
    ann_file, image_dir = write_coco(tmp_path)  # image 0 is 40×30 with boxes [1, 2, 11, 7], [20, 10, 39, 30]
    reader = CocoDetection(ann_file, image_dir)
    path = tmp_path / "proposals.json"
    # Each image's proposals are its ground-truth boxes, plus one box that lies partly outside a 64² canvas.
    save_proposals(path, {i: torch.cat([torch.from_numpy(reader.annotations(i)[0]), torch.tensor([[0.0, 0, 4, 4]])])
                          for i in reader.image_ids})
    dataset = WithProposals(reader, path)
    for transforms in (Letterbox(64), TrainTransform(64, scale=(1.0, 1.0), translate=0.0, fliplr=1.0),
                       TrainTransform(64, seed=3, fliplr=0.5)):
        reader.transforms = transforms
        for index in range(len(reader)):
            image, target = dataset[index]
            proposals, boxes = target["proposals"], target["boxes"]
            assert proposals.dtype == torch.float32 and proposals.shape[1] == 4
            assert (proposals >= 0).all() and (proposals <= 64).all()
            assert (proposals[:, 2:] > proposals[:, :2]).all()
            if isinstance(transforms, Letterbox) or transforms.translate == 0:  # nothing cut: boxes kept as is
                assert torch.allclose(proposals[: len(boxes)], boxes)
    reader.transforms = Letterbox(64)
    _, target = dataset[0]
    left, top = target["pad"]
    assert torch.allclose(target["proposals"][-1], torch.tensor([0.0, 0, 4, 4]) * target["ratio"]
                          + torch.tensor([left, top, left, top]))
    assert dataset.class_names == reader.class_names and len(dataset) == len(reader)


def test_an_image_without_proposals_is_named_with_the_file_at_start(tmp_path):
    ann_file, image_dir = write_coco(tmp_path)
    path = tmp_path / "few.json"
    save_proposals(path, {0: torch.tensor([[0.0, 0, 5, 5]])})
    with pytest.raises(ProposalFileError, match=r"few.json' has no proposals for image_id 1 \(and 1 other"):
        WithProposals(CocoDetection(ann_file, image_dir, transforms=Letterbox(64)), path)


def test_a_transform_that_cannot_map_proposals_refuses_them(tmp_path):
    from detkit.data.augment import AugmentTransform

    ann_file, image_dir = write_coco(tmp_path)
    path = tmp_path / "proposals.json"
    save_proposals(path, {i: torch.tensor([[0.0, 0, 5, 5]]) for i in range(3)})
    dataset = WithProposals(CocoDetection(ann_file, image_dir, transforms=AugmentTransform(64, "ssd")), path)
    with pytest.raises(ValueError, match="image_id 0 carries proposals that this transform does not map"):
        dataset[0]
    assert np.array_equal(dataset.get_sample(0).proposals, [[0.0, 0, 5, 5]])
