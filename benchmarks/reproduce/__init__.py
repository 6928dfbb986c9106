"""One script per paper, running its headline experiment on our data at the paper's schedule, torch-pruning's
criteria alongside: pfa, pca, lda, car, lrs (`python -m benchmarks.reproduce.<name> --help`)."""
