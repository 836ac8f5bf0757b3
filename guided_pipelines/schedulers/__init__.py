from .scheduling_adm import ADMScheduler, ADMSchedulerOutput, get_named_beta_schedule, space_timesteps

__all__ = ["ADMScheduler", "ADMSchedulerOutput", "get_named_beta_schedule", "space_timesteps"]
