"""Applications built on peft-geora: the ``peft-geora`` command line, ``inspect``, the demo, its task and the built-in
model. Outside the library package, so that ``peft-geora --help`` imports nothing heavy."""
