from bnfold.cli import main

if __name__ == "__main__":  # not in a batch worker, which imports this module again (spawn)
    main()
