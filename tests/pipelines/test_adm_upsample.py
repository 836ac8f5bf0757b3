import numpy as np
import PIL.Image
import pytest
import torch

from guided_pipelines import ADMScheduler, ADMSuperResUNet2DModel, ADMUpsamplePipeline
from guided_pipelines.pipelines.pipeline_adm_upsample import low_res_to_tensor


@pytest.fixture
def upsampler():
    torch.manual_seed(0)
    unet = ADMSuperResUNet2DModel(sample_size=8, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                                  channel_mult=(1, 2), num_head_channels=16, num_classes=3, low_res_size=4,
                                  use_scale_shift_norm=True, resblock_updown=True)
    pipe = ADMUpsamplePipeline(unet=unet.eval(), scheduler=ADMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_low_res_formats_agree():
    arr = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    expected = torch.from_numpy(arr.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    torch.testing.assert_close(low_res_to_tensor(arr, 3), expected)
    torch.testing.assert_close(low_res_to_tensor([PIL.Image.fromarray(a) for a in arr], 3), expected)
    torch.testing.assert_close(low_res_to_tensor(arr.astype(np.float32) / 255, 3), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(low_res_to_tensor(expected, 3), expected)


def test_upsample_runs_and_is_seeded(upsampler, tmp_path):
    low = torch.rand(2, 3, 4, 4) * 2 - 1
    a = upsampler(low, class_labels=[0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert a.images.shape == (2, 8, 8, 3)
    upsampler.save_pretrained(tmp_path)
    again = ADMUpsamplePipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert again.unet.config.in_channels == 3 and again.unet.config.low_res_size == 4
    b = again(low, class_labels=[0, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize(
    "low_res, labels, message",
    [
        (torch.zeros(1, 3, 8, 8), [0], "takes 4×4 inputs"),
        (torch.zeros(1, 1, 4, 4), [0], r"\(N, 3, h, w\)"),
        (torch.full((1, 3, 4, 4), 3.0), [0], r"\[-1, 1\]"),
        (torch.zeros(1, 3, 4, 4), None, "class-conditional"),
        (torch.zeros(2, 3, 4, 4), [0, 1, 2], "3 class_labels for 2"),
        (torch.zeros(1, 3, 4, 4), [5], "must lie in"),
        ("image.png", [0], "PIL images, a numpy array or a tensor"),
    ],
)
def test_bad_upsample_input(upsampler, low_res, labels, message):
    with pytest.raises(ValueError, match=message):
        upsampler(low_res, class_labels=labels, num_inference_steps=2)
