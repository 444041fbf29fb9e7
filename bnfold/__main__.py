from bnfold.cli import main

main()
