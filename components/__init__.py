"""KFP lightweight components: thin shims, each calling one function of `flminillm.steps`.

Bodies are self-contained (imports inside) because KFP ships the function's source to the
task; on a cluster they run in our image, which already holds flminillm and kfp.
"""

from components.round_steps import DEFAULT_IMAGE, RoundComponents, build_components

__all__ = ["DEFAULT_IMAGE", "RoundComponents", "build_components"]
