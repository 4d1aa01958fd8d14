from dmdcli.cli import main

main()
