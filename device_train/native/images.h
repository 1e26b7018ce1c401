// The user's photos, read as runtime/images.py reads them (docs/formats.md, "Photos"): which files of a
// folder are photos, which are refused and with what message (the same text and the same order of
// checks), decoding to 8-bit RGB with stb_image, the centre square crop and the bicubic resize in
// float64, giving the same float32 values in [-1, 1].
#pragma once

#include <string>
#include <vector>

#include "common.h"

namespace blockskip {

// The photos of folder `dir` in name order, as paths `dir/name` written as Python's pathlib writes
// them; throws InputError for a missing folder, no photos, or the first entry (in name order) that is
// refused.
std::vector<std::string> list_photos(const std::string& dir);

// One photo as [3, size, size] float32 in [-1, 1]; throws InputError naming the file and what to do.
FTensor load_photo(const std::string& path, int size);

// All photos of `dir` as [N, 3, size, size]; their file names (in that order) into `names` when given.
FTensor load_photos(const std::string& dir, int size, std::vector<std::string>* names = nullptr);

}  // namespace blockskip
