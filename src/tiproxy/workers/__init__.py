"""`[proxy] workers` > 1: a control process and worker processes that hold the sessions."""
