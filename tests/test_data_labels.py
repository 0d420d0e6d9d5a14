"""The label table, against cityscapesScripts' official definitions where that package is installed."""
import numpy as np
import pytest

from dataset.labels import (CLASS_NAMES, IGNORE_LABEL, MAX_LABEL_ID, NUM_CLASSES, PALETTE, label_ids_to_train_ids,
                            train_ids_to_label_ids)


@pytest.mark.extra("cityscapesscripts")
def test_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers import labels as cs_labels

    evaluated = sorted((l for l in cs_labels.labels if l.trainId not in (255, -1)), key=lambda l: l.trainId)
    assert NUM_CLASSES == len(evaluated) == 19
    assert [l.trainId for l in evaluated] == list(range(NUM_CLASSES))
    assert list(CLASS_NAMES) == [l.name for l in evaluated]
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (19, 3)
    assert [tuple(c) for c in PALETTE.tolist()] == [l.color for l in evaluated]
    assert MAX_LABEL_ID == max(l.id for l in cs_labels.labels)  # larger values in a label file are unknown


@pytest.mark.extra("cityscapesscripts")
def test_every_label_id_maps_like_cityscapesscripts():
    from cityscapesscripts.helpers import labels as cs_labels

    label_ids = np.arange(256, dtype=np.uint8)
    expected = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for l in cs_labels.labels:
        if 0 <= l.id < 256 and l.trainId not in (255, -1):
            expected[l.id] = l.trainId
    got = label_ids_to_train_ids(label_ids)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def test_round_trip_and_shapes():
    train_ids = np.array([[0, 10, 18], [255, 13, 5]], dtype=np.uint8)
    label_ids = train_ids_to_label_ids(train_ids)
    assert label_ids.shape == train_ids.shape and label_ids.dtype == np.uint8
    np.testing.assert_array_equal(label_ids, [[7, 23, 33], [0, 26, 17]])
    np.testing.assert_array_equal(label_ids_to_train_ids(label_ids), train_ids)


def test_out_of_range_ids_are_refused():
    with pytest.raises(ValueError, match="label ids"):
        label_ids_to_train_ids(np.array([300]))
