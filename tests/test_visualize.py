import cv2
import numpy as np

from spp_detect.evaluation.visualize import class_colour, draw_detections, save_png
from spp_detect.structures import ImageDetections


def test_draw_detections_marks_the_box_border():
    image = np.full((100, 120, 3), 128, np.uint8)
    boxes = np.array([[20.0, 40.0, 80.0, 90.0], [0.0, 0.0, 10.0, 10.0]], np.float32)
    found = ImageDetections(boxes=boxes, scores=np.array([0.7, -3.0]), labels=np.array([1, 0]))
    drawn = draw_detections(image, detections=found, class_names=["a", "b"])
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert (image == 128).all()  # the input is not modified
    colour = class_colour(1)
    np.testing.assert_array_equal(drawn[70, 20], colour)  # left edge of the box
    np.testing.assert_array_equal(drawn[89, 50], colour)  # bottom edge (y2 exclusive → row 89)
    np.testing.assert_array_equal(drawn[65, 50], [128, 128, 128])  # inside, away from the label
    assert (drawn[:12, :12] == 128).all()  # the second box scores below the demo threshold
    label_area = drawn[25:40, 20:40]
    assert (label_area != 128).any()  # a filled label background above the box


def test_class_colours_are_distinct_and_stable():
    colours = [class_colour(i) for i in range(20)]
    assert len(set(colours)) == 20
    assert colours == [class_colour(i) for i in range(20)]


def test_save_png(tmp_path):
    image = np.zeros((8, 9, 3), np.uint8)
    image[2, 3] = [255, 0, 0]  # red in RGB
    path = tmp_path / "out" / "det.png"
    save_png(path, image)
    read = cv2.imread(str(path))  # BGR
    assert read.shape == (8, 9, 3)
    np.testing.assert_array_equal(read[2, 3], [0, 0, 255])
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_labels_name_each_box_by_its_own_class_and_score(monkeypatch):
    """One class, scores above 1: the caption is "<class> <score>" of that detection (a swapped
    scores/labels pair once drew "square 2.00" or raised IndexError)."""
    from spp_detect.evaluation import visualize

    captions = []
    monkeypatch.setattr(visualize, "_draw_label", lambda _, text, *__: captions.append(text))
    found = ImageDetections(
        boxes=np.array([[10, 10, 40, 40], [50, 50, 90, 90]], np.float32),
        scores=np.array([2.0, 1.58], np.float32),
        labels=np.array([0, 0]),
    )
    draw_detections(np.zeros((100, 100, 3), np.uint8), detections=found, class_names=["raccoon"])
    assert captions == ["raccoon 1.58", "raccoon 2.00"]  # lower scores first, best on top
