# Copyright (c) radfm3d contributors. Apache-2.0.
