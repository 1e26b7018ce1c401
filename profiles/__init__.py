"""Device profiles shipped as TOML data files (read by ``blockskip.runtime.profiles``)."""
