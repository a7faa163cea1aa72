"""The old path ``clipdistill.engine.towers``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.models.towers`` instead.
The module was: Re-driving open_clip's towers with prompt tokens, without forking their code.
"""
from clipdistill.engine.models.towers import LayerHook, TextTower, check_vision_tower, encode_image, run_blocks

__all__ = ["LayerHook", "TextTower", "check_vision_tower", "encode_image", "run_blocks"]
