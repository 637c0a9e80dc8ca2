# kernels/train.h sources (filled by the training-kernels work)
