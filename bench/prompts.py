"""The prompts of the medium-model benchmarks, one copy so that their figures compare.

No imports: ``side_by_side.py`` reads these before it starts timing its imports.
"""

PROMPT = "a red cat sitting on a blue chair next to a small green house by the river"
EDIT_PROMPT = "Replace the red square with a blue circle"
