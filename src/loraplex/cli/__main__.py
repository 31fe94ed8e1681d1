from loraplex.cli import main

main()
