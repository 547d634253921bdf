from . import main

if __name__ == "__main__":  # not in a worker process that multiprocessing's spawn starts
    main()
