"""``KeizokuError``: a problem the user can fix — bad input, a setting that cannot be honoured, a missing file.

The command line prints its message as one line (``error: …``) and exits 1 (``keizoku.rundir.ExitCode``), never
with a traceback; the message names the file, line, key or flag at fault and what to do. Each part of keizoku
has its own subclass (``ConfigError``, ``DataError``, ``TrainingError``, ``MegatronError``, …). The launch
modules that run on a compute node's bare ``python3`` (``keizoku.launch.driver`` and what it imports) keep
standard-library exceptions of their own.
"""


class KeizokuError(Exception):
    pass
