import pytest
import torch

from guided_pipelines import ADMClassifierModel, ADMScheduler, ADMUNet2DModel, ClassifierGuidedPipeline

TINY = dict(
    sample_size=8,
    in_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=(2,),
    channel_mult=(1, 2),
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "golden retriever", 3: "toilet tissue"}


def _randomize(model, seed):
    # The output convolutions are zero in a fresh model; give every parameter random values.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture
def tiny_pipeline():
    """``make(conditional=True, classifier=True, learned=True)``: a small random guided pipeline."""

    def make(conditional=True, classifier=True, learned=True, num_classes=4):
        torch.manual_seed(0)
        unet = ADMUNet2DModel(**TINY, out_channels=6 if learned else 3, num_classes=num_classes if conditional else None)
        clf = ADMClassifierModel(**TINY, num_classes=num_classes, pool="attention") if classifier else None
        scheduler = ADMScheduler(variance_type="learned_range" if learned else "fixed_large")
        pipe = ClassifierGuidedPipeline(
            unet=_randomize(unet, 1), scheduler=scheduler, classifier=_randomize(clf, 2) if clf else None,
            id2label=ID2LABEL if num_classes == 4 else None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make
