"""One thin module per verb: ``python -m jobs.<verb>`` (the entrypoint for ``ray job submit``) or ``musiclm <verb>``.
They parse arguments, connect to Ray and call the ``musiclm`` library; no logic lives here."""
