"""Crop geometry and normalisation: the one preprocessing path of training and inference."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from ferengine.preprocess import InputSpec, crop_faces, crop_transform, eye_angle, to_model_input


def test_spec_round_trip_and_validation():
    spec = InputSpec(size=96, channels=3, mean=0.5, std=(0.25,), crop_margin=0.4)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="channels"):
        InputSpec(channels=2)
    with pytest.raises(ValueError, match="std must be positive"):
        InputSpec(std=0.0)
    with pytest.raises(ValueError, match="unknown input-spec fields"):
        InputSpec.from_dict({"size": 48, "colour": "red"})


BAD_SPECS = [
    ({"size": float("nan")}, "InputSpec.size must be an integer from 8 to 1024"),
    ({"size": 0}, "InputSpec.size must be an integer from 8 to 1024, got 0"),
    ({"size": 48.5}, "InputSpec.size must be an integer"),
    ({"size": "48"}, "got '48' (str)"),
    ({"size": True}, "InputSpec.size must be an integer"),
    ({"channels": 2}, "InputSpec.channels must be 1 (grey) or 3 (RGB)"),
    ({"mean": float("nan")}, "InputSpec.mean must be finite"),
    ({"mean": [0.5, 0.5]}, "InputSpec.mean needs 1 value"),
    ({"std": float("inf")}, "InputSpec.std must be finite"),
    ({"std": -0.5}, "InputSpec.std must be positive"),
    ({"std": "abc"}, "InputSpec.std must be a number or a list of 1 number"),
    ({"crop_margin": float("nan")}, "InputSpec.crop_margin must be a finite number"),
    ({"crop_margin": -0.95}, "InputSpec.crop_margin must be > -0.9"),
    ({"crop_margin": 50.0}, "InputSpec.crop_margin must be > -0.9 and <= 10"),
    ({"crop_offset_y": float("-inf")}, "InputSpec.crop_offset_y must be a finite number"),
    ({"crop_offset_y": 3.0}, "InputSpec.crop_offset_y must be in [-2, 2]"),
    ({"align": "yes"}, "InputSpec.align must be true or false"),
    ({"source_size": 4}, "InputSpec.source_size must be an integer from 8 to 1024"),
    ({"source_size": float("nan")}, "InputSpec.source_size must be an integer"),
]


@pytest.mark.parametrize("fields,message", BAD_SPECS, ids=[str(f) for f, _ in BAD_SPECS])
def test_every_bad_field_fails_in_the_constructor_and_from_dict(fields, message):
    from ferengine.errors import InvalidValue

    with pytest.raises(InvalidValue) as exc:
        InputSpec(**fields)
    assert message in str(exc.value)
    with pytest.raises(InvalidValue) as exc:
        InputSpec.from_dict({**InputSpec().to_dict(), **fields})
    assert message in str(exc.value)


def test_from_dict_wants_an_object_and_normalises_numbers():
    with pytest.raises(ValueError, match="the input spec must be an object of fields .* got 'hello' \\(str\\)"):
        InputSpec.from_dict("hello")
    with pytest.raises(ValueError, match="got \\[48\\] \\(list\\)"):
        InputSpec.from_dict([48])
    spec = InputSpec.from_dict({"size": 64.0, "channels": 3, "mean": 0, "std": [1, 2, 3], "align": False})
    assert spec.size == 64 and type(spec.size) is int and spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 2.0, 3.0)
    assert InputSpec(size=np.int64(32), crop_margin=np.float32(0.5)).to_dict()["size"] == 32


def test_crop_centres_the_box_and_scales_by_margin():
    frame = np.zeros((200, 300, 3), np.uint8)
    frame[80:120, 130:170] = 255  # a 40x40 white square centred at (150, 100)
    spec = InputSpec(size=40, channels=1, crop_margin=1.0, align=False)  # crop side 80 -> square is half
    crop = crop_faces(frame, [(130, 80, 40, 40)], None, spec)
    assert crop.shape == (1, 40, 40) and crop.dtype == np.uint8
    white = crop[0] > 127
    ys, xs = np.nonzero(white)
    assert abs(ys.mean() - 19.5) < 0.6 and abs(xs.mean() - 19.5) < 0.6
    assert 18 <= white.sum() ** 0.5 <= 22  # 20x20 white square in a 40x40 crop


def test_large_faces_are_shrunk_without_aliasing():
    # 1-pixel stripes shrunk 6x must average to flat grey, not to a moire of black and white bands
    frame = np.zeros((400, 400), np.uint8)
    frame[:, ::2] = 255
    spec = InputSpec(size=48, crop_margin=0.0, align=False)
    crop = crop_faces(frame, [(56, 56, 288, 288)], None, spec)[0].astype(float)
    assert abs(crop.mean() - 127.5) < 3 and crop.std() < 10


def test_crop_offset_moves_the_centre_down():
    frame = np.zeros((200, 200), np.uint8)
    frame[100:, :] = 255  # lower half white
    spec0 = InputSpec(size=32, crop_margin=0.0, align=False)
    spec1 = InputSpec(size=32, crop_margin=0.0, align=False, crop_offset_y=0.25)
    box = [(60, 60, 80, 80)]  # centred at y=100
    m0 = crop_faces(frame, box, None, spec0)[0].mean()
    m1 = crop_faces(frame, box, None, spec1)[0].mean()
    assert abs(m0 - 127.5) < 10 and m1 > 180  # shifted down by 20 px -> 3/4 white


def test_alignment_levels_a_tilted_eye_line():
    # eyes at 30 degrees; after alignment they must sit on one horizontal row
    frame = np.zeros((200, 200), np.uint8)
    c = np.array([100.0, 100.0])
    d = np.array([math.cos(math.radians(30)), math.sin(math.radians(30))]) * 30
    left, right = c - d, c + d
    for p in (left, right):
        cv_pt = tuple(int(round(v)) for v in p)
        frame[cv_pt[1] - 3 : cv_pt[1] + 4, cv_pt[0] - 3 : cv_pt[0] + 4] = 255
    kps = np.array([right, left, c, c, c, c], np.float32)  # BlazeFace order: eye, eye, ...
    assert math.degrees(eye_angle(kps)) == pytest.approx(30, abs=1e-4)
    spec = InputSpec(size=100, crop_margin=0.0, align=True)
    crop = crop_faces(frame, [(50, 50, 100, 100)], [kps], spec)[0]
    ys, xs = np.nonzero(crop > 127)
    left_blob, right_blob = ys[xs < 50], ys[xs >= 50]
    assert abs(left_blob.mean() - right_blob.mean()) < 1.0
    assert abs(xs[xs >= 50].mean() - xs[xs < 50].mean() - 60) < 2  # eye distance preserved (scale 1)
    # without alignment the two blobs are on different rows
    crop_u = crop_faces(frame, [(50, 50, 100, 100)], [kps], InputSpec(size=100, crop_margin=0.0, align=False))[0]
    ys, xs = np.nonzero(crop_u > 127)
    assert abs(ys[xs < 50].mean() - ys[xs >= 50].mean()) > 20


def test_crop_transform_maps_box_centre_to_crop_centre():
    spec = InputSpec(size=64, crop_margin=0.3)
    m = crop_transform((10, 20, 50, 70), None, spec)
    centre = m @ np.array([35.0, 55.0, 1.0])
    assert np.allclose(centre, [32, 32])


def test_normalise_numpy_and_torch_agree_and_match_formula():
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (3, 48, 48), dtype=np.uint8)
    spec = InputSpec(size=48, mean=0.4, std=0.2)
    a = to_model_input(faces, spec)
    assert a.shape == (3, 1, 48, 48) and a.dtype == np.float32
    assert np.allclose(a[:, 0], (faces / 255.0 - 0.4) / 0.2, atol=1e-5)
    t = to_model_input(torch.from_numpy(faces), spec)
    assert isinstance(t, torch.Tensor)
    assert np.abs(t.numpy() - a).max() < 1e-5


def test_channel_conversion_and_resize():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    grey = to_model_input(rgb, InputSpec(size=48, channels=1, mean=0.0, std=1.0))
    assert grey.shape == (2, 1, 48, 48)
    luma = rgb @ np.array([0.299, 0.587, 0.114]) / 255.0
    assert abs(grey.mean() - luma.mean()) < 1e-3
    g = rng.integers(0, 256, (2, 48, 48), dtype=np.uint8)
    x3 = to_model_input(g, InputSpec(size=64, channels=3))
    assert x3.shape == (2, 3, 64, 64)
    assert np.array_equal(x3[:, 0], x3[:, 2])
    t3 = to_model_input(torch.from_numpy(g), InputSpec(size=64, channels=3))
    assert t3.shape == (2, 3, 64, 64)
    assert np.abs(t3.numpy() - x3).max() < 0.05  # bilinear in both, tiny kernel differences
    with pytest.raises(ValueError, match="expected faces"):
        to_model_input(np.zeros((2, 48, 48, 2), np.uint8), InputSpec())


# ------------------------------------------------------------------ one arithmetic, training resolution


@pytest.mark.parametrize("size", [96, 48, 32], ids=["upsample", "same", "shrink"])
@pytest.mark.parametrize("rgb", [False, True], ids=["grey", "rgb"])
def test_numpy_and_torch_paths_are_one_arithmetic(size, rgb):
    """The app / fer eval (numpy uint8) and the training batches (torch) give the same model input to the
    last bit, also where faces are resized (48 -> 96 up, 48 -> 32 down) and RGB is turned grey."""
    import torch

    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (5, 48, 48, 3) if rgb else (5, 48, 48), dtype=np.uint8)
    spec = InputSpec(size=size, channels=1, mean=(0.4,), std=(0.3,))
    a = to_model_input(faces, spec)
    t = torch.from_numpy(faces)
    b = to_model_input(t.permute(0, 3, 1, 2) if rgb else t, spec).numpy()
    assert a.shape == b.shape == (5, 1, size, size) and a.dtype == np.float32
    assert np.array_equal(a, b), f"max diff {np.abs(a - b).max():.3g}"
    # what training feeds after augmenting: float faces in [0, 1] (the identity augmentation is x / 255)
    f = to_model_input(t.float().div(255.0).permute(0, 3, 1, 2) if rgb else t.float().div(255.0).unsqueeze(1), spec)
    np.testing.assert_allclose(f.numpy(), a, rtol=0, atol=1e-6)


def test_crops_are_cut_at_the_training_faces_resolution():
    """A 96 px model trained on 48 px faces (source_size 48): crop_faces cuts at 48 (its area path) and
    to_model_input upsamples as training did; the 96 px detail of the frame never reaches the model."""
    rng = np.random.default_rng(1)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8), (3, 3), 0)
    box, kp = (100, 100, 200, 200), None
    native = InputSpec(size=96, channels=1, source_size=48, mean=(0.0,), std=(1.0,))
    crops = crop_faces(frame, [box], [kp], native)
    assert crops.shape == (1, 48, 48) and native.crop_size == 48
    x = to_model_input(crops, native)
    assert x.shape == (1, 1, 96, 96)
    small = InputSpec(size=48, channels=1, mean=(0.0,), std=(1.0,))
    assert np.array_equal(crops, crop_faces(frame, [box], [kp], small)), "the same crop a 48 px model gets"
    direct = to_model_input(crop_faces(frame, [box], [kp], InputSpec(size=96, channels=1, mean=(0.0,), std=(1.0,))),
                            native)
    # cut at 96 directly the crop holds finer detail than the 48 px training faces had
    lap = lambda im: float(np.abs(cv2.Laplacian(im[0, 0].astype(np.float64), cv2.CV_64F)).mean())  # noqa: E731
    assert lap(direct) > 1.5 * lap(x)
    assert InputSpec(size=48, source_size=48).source_size is None, "a source size equal to the size is no source size"
    assert "source_size" not in InputSpec().to_dict(), "specs without one stay readable by older versions"
    assert InputSpec.from_dict(native.to_dict()) == native
