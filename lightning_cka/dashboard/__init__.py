"""The CKA dashboard of TensorBoard: the tensor summaries the monitor writes, and the plugin that shows them."""
