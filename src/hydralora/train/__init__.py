"""Training: the run's options (`config`), the Trainer subclass (`trainer`), the output
folder (`output`) and the run from data to summary (`run`)."""
