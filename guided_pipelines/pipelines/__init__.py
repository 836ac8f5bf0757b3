from .pipeline_adm_upsample import ADMUpsamplePipeline
from .pipeline_classifier_guided import ClassifierGuidedPipeline, ClassifierGuidedPipelineOutput, to_uint8

__all__ = ["ClassifierGuidedPipeline", "ADMUpsamplePipeline", "ClassifierGuidedPipelineOutput", "to_uint8"]
