from crossaudit.cli import app

app(prog_name="crossaudit")
