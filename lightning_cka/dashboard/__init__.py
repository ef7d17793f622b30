"""The TensorBoard "CKA" tab.

The monitor's figures become tensor summaries (:mod:`.summaries`); the plugin (:mod:`.plugin`) serves them to an
interactive dashboard (``static/index.js``).

Nothing here imports torch: TensorBoard loads the plugin at start-up, whatever the logdir holds.
"""
