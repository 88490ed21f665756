from vlmcli.cli import run

run()
