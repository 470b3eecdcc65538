from keizoku.cli import main

main()
