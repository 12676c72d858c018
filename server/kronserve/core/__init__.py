"""The engine in its own process: the child that owns the device (`engine_process`), the API process's client
(`client`), the parent's supervisor that restarts a dead engine (`supervisor`), and what travels between them
(`wire`)."""
