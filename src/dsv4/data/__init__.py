"""Package data: `demo.zip`, the shipped demo model (see `dsv4.portable.tiny.ensure_demo`)."""
