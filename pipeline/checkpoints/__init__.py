"""Single-file checkpoints: one ``.safetensors`` in the original LDM/SGM layout, as users have them.

SD1.5 and SDXL (so Pony, Illustrious and the other SDXL fine-tunes): ``describe`` reads what a
file is from its header, ``load`` loads its components offline into a ``DiffusionModel``
(``tools.checkpoint_writer`` writes them, for tests). Pickle formats are refused unread. This
package's own import stays light (no torch): the API process describes checkpoints.
"""
