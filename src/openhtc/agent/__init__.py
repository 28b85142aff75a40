"""``htc agent``: the local executor on another machine, speaking the executor protocol over HTTP."""
