"""dsv4.cli: the `dsv4` command (typer + rich); `resolve` turns --model/--backend into a loaded Model."""
