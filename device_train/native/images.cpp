// The photo definition of docs/formats.md ("Photos"), mirroring runtime/images.py line for line: the
// listing, the header checks (our own scan of the PNG / JPEG / BMP headers, so both sides refuse the
// same files with the same message; the EXIF orientation and the PNG transparency are read there too),
// stb_image for the decoding, alpha composited on white, and the upright crop and resize in float64.
// Compiled without floating-point contraction: the resize's products and sums are rounded one by one,
// as numpy rounds them.

#include "images.h"

#include "formats.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_ONLY_BMP
#define STBI_NO_STDIO
#define STBI_FAILURE_USERMSG
#include <stb_image.h>

namespace blockskip {
namespace {

const char* const kSupported[] = {".bmp", ".jpeg", ".jpg", ".png"};  // sorted, as the message lists them
const char* const kRefused[] = {".webp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif"};
constexpr int64_t kMinSide = formats::kPhotoMinSide;
constexpr uint64_t kMaxPixels = formats::kPhotoMaxPixels;
static_assert(kMaxPixels % 1000000 == 0, "the refusal states the limit in whole Mpx");

// ---------------------------------------------------------------------------------------- paths

// A path as str(pathlib.PurePosixPath(p)) writes it: no empty or "." components, no trailing slash.
std::string pathlib_str(const std::string& p) {
  if (p.empty()) return ".";
  std::string lead;
  if (p[0] == '/') lead = (p.size() >= 2 && p[1] == '/' && (p.size() == 2 || p[2] != '/')) ? "//" : "/";
  std::string out;
  size_t i = 0;
  while (i <= p.size()) {
    size_t j = p.find('/', i);
    if (j == std::string::npos) j = p.size();
    std::string part = p.substr(i, j - i);
    if (!part.empty() && part != ".") out += (out.empty() ? "" : "/") + part;
    i = j + 1;
  }
  out = lead + out;
  return out.empty() ? "." : out;
}

// pathlib's `dir / name` for a normalised dir.
std::string path_join(const std::string& dir, const std::string& name) {
  if (dir == ".") return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

// Python's repr() of a str (printable text; control characters escaped as Python escapes them).
std::string py_repr(const std::string& s) {
  const char q = (s.find('\'') != std::string::npos && s.find('"') == std::string::npos) ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\' || c == static_cast<unsigned char>(q)) {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + q;
}

// pathlib's suffix, lower-cased in ASCII.
std::string suffix(const std::string& name) {
  size_t i = name.rfind('.');
  if (i == std::string::npos || i == 0 || i + 1 >= name.size()) return "";
  std::string ext = name.substr(i);
  for (char& c : ext)
    if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
  return ext;
}

bool one_of(const std::string& ext, const char* const* list, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (ext == list[i]) return true;
  return false;
}

std::string real_path(const std::string& p, bool* ok) {
  std::unique_ptr<char, decltype(&std::free)> r(::realpath(p.c_str(), nullptr), &std::free);
  *ok = r != nullptr;
  return r ? std::string(r.get()) : std::string();
}

bool inside(const std::string& real, const std::string& root) {
  if (real == root) return true;
  const std::string prefix = (!root.empty() && root.back() == '/') ? root : root + "/";
  return real.compare(0, prefix.size(), prefix) == 0;
}

// ------------------------------------------------------------------------------- header checks

struct Unreadable {
  std::string reason;
};

struct Header {
  std::string kind;  // "PNG", "JPEG" or "BMP"
  int64_t width = 0, height = 0;  // as stored (before the orientation)
  int png_depth = 8;
  int png_color = 2;      // the PNG colour type
  bool png_key = false;   // a gray or RGB PNG with a transparent colour (stb_image applies it)
  bool alpha = false;     // an alpha channel or a transparency chunk: composited on white
  int jpeg_components = 3;
  int jpeg_precision = 8;
  bool jpeg_adobe_cmyk = false;  // 4 components are Adobe CMYK (APP14 "Adobe" transform 0): decoded
  int orientation = 1;           // EXIF orientation 1-8 (1: as stored)
  std::string unsupported;       // a variant neither side decodes the same way: why
  bool truncated = false;

  // The first unsupported variant found is the one named.
  void refuse(const std::string& why) {
    if (unsupported.empty()) unsupported = why;
  }
};

uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }
uint32_t be16(const uint8_t* p) { return uint32_t(p[0]) << 8 | p[1]; }
uint32_t le32(const uint8_t* p) { return uint32_t(p[3]) << 24 | uint32_t(p[2]) << 16 | uint32_t(p[1]) << 8 | p[0]; }
uint32_t le16(const uint8_t* p) { return uint32_t(p[1]) << 8 | p[0]; }

// CRC-32 (ISO 3309, as zlib.crc32) of PNG chunks.
uint32_t crc32(const uint8_t* p, size_t n) {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(256);
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// The orientation (tag 0x0112 of IFD0, one SHORT, 1-8) of an EXIF block (a TIFF header and its IFDs)
// of n bytes; 1 when the block is malformed, has no such entry, or holds another value.
int exif_orientation(const uint8_t* t, size_t n) {
  if (n < 8) return 1;
  bool little;
  if (t[0] == 'I' && t[1] == 'I') {
    little = true;
  } else if (t[0] == 'M' && t[1] == 'M') {
    little = false;
  } else {
    return 1;
  }
  auto u16 = [&](uint64_t at) { return little ? le16(t + at) : be16(t + at); };
  auto u32 = [&](uint64_t at) { return little ? le32(t + at) : be32(t + at); };
  if (u16(2) != 42) return 1;
  const uint64_t ifd = u32(4);
  if (ifd + 2 > n) return 1;
  const uint32_t count = u16(ifd);
  for (uint32_t i = 0; i < count; ++i) {
    const uint64_t at = ifd + 2 + 12 * uint64_t(i);
    if (at + 12 > n) return 1;
    if (u16(at) == 0x0112) {
      const uint32_t value = u16(at + 8);
      return u16(at + 2) == 3 && u32(at + 4) == 1 && value >= 1 && value <= 8 ? int(value) : 1;
    }
  }
  return 1;
}

bool starts_with(const uint8_t* p, size_t n, const char* prefix, size_t k) {
  return n >= k && std::memcmp(p, prefix, k) == 0;
}

const char kExif[] = "Exif\0";  // with the terminating NUL: 6 bytes

// A tRNS chunk of `len` bytes: the palette's alphas, or the one transparent gray / RGB colour. The
// variants the two decoders read differently (or one refuses) are refused.
void png_transparency(Header& h, const uint8_t* body, uint64_t len, bool idat, bool again, int64_t palette) {
  if (idat) return h.refuse("PNG transparency chunk (tRNS) after the image data");
  if (again) return h.refuse("PNG with more than one transparency chunk (tRNS)");
  const int color = h.png_color, depth = h.png_depth;
  if (color == 3) {
    if (palette < 0) return h.refuse("PNG transparency chunk (tRNS) before the palette");
    if (int64_t(len) > palette) return h.refuse("PNG transparency chunk (tRNS) longer than the palette");
    h.alpha = true;
  } else if (color == 0 || color == 2) {
    const uint64_t channels = color == 0 ? 1 : 3;
    if (len != 2 * channels) return h.refuse("PNG transparency chunk (tRNS) of the wrong length");
    uint32_t most = 0;
    for (uint64_t c = 0; c < channels; ++c) most = std::max(most, be16(body + 2 * c));
    if ((depth != 1 && depth != 2 && depth != 4 && depth != 8 && depth != 16) || most >= (1u << depth))
      return h.refuse("PNG transparent colour (tRNS) out of range for the bit depth");
    if (depth == 16 && color == 2) return h.refuse("16-bit RGB PNG with a transparent colour (tRNS) is not supported");
    h.png_key = true;
    h.alpha = true;
  } else {
    h.refuse("PNG transparency chunk (tRNS) on an image with an alpha channel");
  }
}

Header probe_png(const std::vector<uint8_t>& d) {
  const size_t n = d.size();
  if (n < 33) throw Unreadable{"truncated"};  // signature + the IHDR chunk
  if (std::memcmp(&d[12], "IHDR", 4) != 0 || be32(&d[8]) != 13)
    throw Unreadable{"the PNG does not start with its header (IHDR)"};
  Header h;
  h.kind = "PNG";
  h.width = be32(&d[16]);
  h.height = be32(&d[20]);
  h.png_depth = d[24];
  h.png_color = d[25];
  h.alpha = h.png_color == 4 || h.png_color == 6;
  h.truncated = true;
  // every chunk whole, up to IEND; the checksums of the chunks before the image data (Pillow checks
  // them, stb_image does not); no critical chunk stb_image does not know (Pillow skips them)
  uint64_t pos = 8;
  bool idat = false, trns = false, exif = false;
  int64_t palette = -1;
  while (pos + 8 <= n) {
    const uint64_t length = be32(&d[pos]);
    const uint64_t end = pos + 12 + length;
    if (end > n) break;
    const uint8_t* kind = &d[pos + 4];
    if (std::memcmp(kind, "IEND", 4) == 0) {
      h.truncated = false;
      break;
    }
    idat = idat || std::memcmp(kind, "IDAT", 4) == 0;
    if (!idat && crc32(kind, size_t(end - 4 - (pos + 4))) != be32(&d[end - 4]))
      throw Unreadable{"bad checksum in a PNG chunk before the image data"};
    if (!(kind[0] & 0x20) && std::memcmp(kind, "IHDR", 4) != 0 && std::memcmp(kind, "PLTE", 4) != 0 &&
        std::memcmp(kind, "IDAT", 4) != 0)
      h.refuse("PNG with an unknown critical chunk");
    const uint8_t* body = &d[pos + 8];
    if (std::memcmp(kind, "PLTE", 4) == 0 && !idat && palette < 0) {
      palette = int64_t(length / 3);
    } else if (std::memcmp(kind, "eXIf", 4) == 0 && !idat && !exif) {
      exif = true;
      const bool prefixed = starts_with(body, length, kExif, 6);
      h.orientation = exif_orientation(body + (prefixed ? 6 : 0), size_t(length - (prefixed ? 6 : 0)));
    } else if (std::memcmp(kind, "tRNS", 4) == 0) {
      png_transparency(h, body, length, idat, trns, palette);
      trns = true;
    }
    pos = end;
  }
  return h;
}

bool is_sof(int m) { return m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC; }

// The next 0xFF at or after pos, or n.
size_t find_ff(const std::vector<uint8_t>& d, size_t pos) {
  if (pos >= d.size()) return d.size();
  const void* p = std::memchr(&d[pos], 0xFF, d.size() - pos);
  return p ? size_t(static_cast<const uint8_t*>(p) - d.data()) : d.size();
}

Header probe_jpeg(const std::vector<uint8_t>& d) {
  const size_t n = d.size();
  size_t pos = 2;
  bool have = false, truncated = true;
  int sof = 0;
  bool scanned = false;   // an SOS seen: the segments after it are not the header's
  int orientation = 0;    // 0: no EXIF segment yet
  bool adobe_before_scan = false, adobe_all_cmyk = true, adobe_any = false;
  Header h;
  h.kind = "JPEG";
  while (true) {
    pos = find_ff(d, pos);  // bytes between segments are skipped, as decoders do
    if (pos >= n) break;
    while (pos < n && d[pos] == 0xFF) ++pos;  // fill bytes
    if (pos >= n) break;
    const int m = d[pos++];
    if (m == 0xD9) {  // EOI
      truncated = false;
      break;
    }
    if ((m >= 0xD0 && m <= 0xD8) || m == 0x01) continue;  // RSTn, SOI, TEM: no length
    if (pos + 2 > n) break;
    const size_t length = be16(&d[pos]);
    if (length < 2) throw Unreadable{"corrupt JPEG marker segment"};
    if (pos + length > n) break;
    if (is_sof(m) && !have) {
      if (length < 8) throw Unreadable{"corrupt JPEG frame header"};
      h.jpeg_precision = d[pos + 2];
      h.height = be16(&d[pos + 3]);
      h.width = be16(&d[pos + 5]);
      h.jpeg_components = d[pos + 7];
      sof = m - 0xC0;
      have = true;
    }
    const uint8_t* body = &d[pos + 2];
    const size_t blen = length - 2;
    if (m == 0xE1 && !scanned && orientation == 0 && starts_with(body, blen, kExif, 6)) {
      orientation = exif_orientation(body + 6, blen - 6);
    } else if (m == 0xEE && starts_with(body, blen, "Adobe", 5)) {
      // the colour transform of each Adobe APP14 segment (unreadable: not CMYK)
      adobe_any = true;
      adobe_all_cmyk = adobe_all_cmyk && blen >= 12 && body[5] == 0 && body[11] == 0;
      adobe_before_scan = adobe_before_scan || !scanned;
    }
    pos += length;
    if (m == 0xDA) {  // SOS: skip the entropy-coded data to the next marker that is not FF00 or RSTn
      if (!have) throw Unreadable{"no JPEG frame header (SOF) before the image data"};
      scanned = true;
      while (true) {
        pos = find_ff(d, pos);
        if (pos + 1 >= n) {
          pos = n;
          break;
        }
        const int b = d[pos + 1];
        if (b == 0x00 || (b >= 0xD0 && b <= 0xD7)) {
          pos += 2;
        } else if (b == 0xFF) {
          pos += 1;
        } else {
          break;
        }
      }
    }
  }
  if (!have) throw Unreadable{truncated ? "truncated" : "no JPEG frame header (SOF)"};
  h.truncated = truncated;
  h.orientation = orientation == 0 ? 1 : orientation;
  h.jpeg_adobe_cmyk = adobe_any && adobe_before_scan && adobe_all_cmyk;
  if (sof != 0 && sof != 1 && sof != 2) {
    h.unsupported = "JPEG coding process SOF" + std::to_string(sof) + " is not supported (only baseline and progressive)";
  } else if (h.jpeg_components != 1 && h.jpeg_components != 3 && h.jpeg_components != 4) {
    h.unsupported = "JPEG with " + std::to_string(h.jpeg_components) + " color components is not supported";
  }
  return h;
}

Header probe_bmp(const std::vector<uint8_t>& d) {
  const size_t n = d.size();
  if (n < 26) throw Unreadable{"truncated"};  // file header + the smallest (OS/2) info header
  const uint64_t offset = le32(&d[10]);
  const uint32_t hsz = le32(&d[14]);
  Header h;
  h.kind = "BMP";
  int bpp = 0;
  uint32_t compression = 0;
  if (hsz == 12) {
    h.width = le16(&d[18]);
    h.height = le16(&d[20]);
    bpp = int(le16(&d[24]));
  } else if (hsz == 40 || hsz == 56 || hsz == 108 || hsz == 124) {
    if (n < 14 + 40) throw Unreadable{"truncated"};
    h.width = int32_t(le32(&d[18]));
    h.height = int32_t(le32(&d[22]));
    bpp = int(le16(&d[28]));
    compression = le32(&d[30]);
    if (h.width < 0) throw Unreadable{"corrupt BMP header (negative width)"};
    if (h.height < 0) h.height = -h.height;  // rows stored top-down
  } else {
    throw Unreadable{"unsupported BMP header (" + std::to_string(hsz) + " bytes)"};
  }
  if (bpp != 1 && bpp != 4 && bpp != 8 && bpp != 24 && bpp != 32) {
    h.unsupported = std::to_string(bpp) + "-bit BMP is not supported";
  } else if (compression == 3 && bpp == 32) {
    if (n < 14 + 40 + (hsz > 40 ? 16 : 12)) throw Unreadable{"truncated"};
    // the masks follow a 40-byte header, or are in the larger ones (with the alpha mask after them)
    if (hsz == 56) {  // stb_image reads the masks of this header from the wrong place
      h.unsupported = "BMP with a 56-byte header and bit fields is not supported";
    } else if (le32(&d[54]) != 0xFF0000u || le32(&d[58]) != 0xFF00u || le32(&d[62]) != 0xFFu ||
               (hsz > 40 && le32(&d[66]) != 0 && le32(&d[66]) != 0xFF000000u)) {
      h.unsupported = "BMP with unusual bit fields is not supported";
    } else {
      h.alpha = hsz > 40 && le32(&d[66]) == 0xFF000000u;
    }
  } else if (compression != 0) {
    h.unsupported = "compressed BMP is not supported";
  }
  const uint64_t stride = (uint64_t(h.width) * uint64_t(bpp) + 31) / 32 * 4;
  // width < 2^31, height <= 2^31, stride < 2^34: the product fits in 64 bits
  h.truncated = offset + stride * uint64_t(h.height) > n;
  return h;
}

Header probe(const std::vector<uint8_t>& d) {
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (d.size() >= 8 && std::memcmp(d.data(), kPng, 8) == 0) return probe_png(d);
  if (d.size() >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return probe_jpeg(d);
  if (d.size() >= 2 && d[0] == 'B' && d[1] == 'M') return probe_bmp(d);
  throw Unreadable{"not a PNG, JPEG or BMP file"};
}

std::string cannot_read(const std::string& path, const std::string& reason) {
  return "cannot read image " + path + ": " + reason + "; remove or replace it";
}

// The checks before decoding, in their order (docs/formats.md, "Photos").
Header check(const std::string& path, const std::vector<uint8_t>& data) {
  if (data.empty()) throw InputError(path + " is empty; remove or replace it");
  Header h;
  try {
    h = probe(data);
  } catch (const Unreadable& e) {
    throw InputError(cannot_read(path, e.reason));
  }
  const std::string wxh = std::to_string(h.width) + "x" + std::to_string(h.height);
  if (std::min(h.width, h.height) < kMinSide)
    throw InputError(path + " is too small (" + wxh + "); use photos of at least " + std::to_string(kMinSide) + " px");
  if (uint64_t(h.width) * uint64_t(h.height) > kMaxPixels)
    throw InputError(path + " is too large (" + wxh + ", more than " + std::to_string(kMaxPixels / 1000000) +
                     " Mpx); downscale it first");
  if (h.kind == "JPEG" && h.jpeg_components == 4 && !h.jpeg_adobe_cmyk)
    throw InputError(path + " is a 4-channel JPEG other than Adobe CMYK (YCCK, or no Adobe marker); "
                     "save it as an RGB JPEG or PNG");
  if (h.kind == "JPEG" && h.jpeg_precision != 8)
    throw InputError(path + " is a " + std::to_string(h.jpeg_precision) + "-bit JPEG; save it as an 8-bit JPEG or PNG");
  if (!h.unsupported.empty()) throw InputError(cannot_read(path, h.unsupported));
  if (h.truncated) throw InputError(cannot_read(path, "truncated"));
  return h;
}

std::vector<uint8_t> read_all(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw InputError(cannot_read(path, std::strerror(errno)));
  std::vector<uint8_t> data;
  uint8_t buf[1 << 16];
  while (true) {
    const ssize_t r = ::read(fd, buf, sizeof buf);
    if (r < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      throw InputError(cannot_read(path, std::strerror(err)));
    }
    if (r == 0) break;
    data.insert(data.end(), buf, buf + r);
  }
  ::close(fd);
  return data;
}

// ------------------------------------------------------------------------------------- resize

// Keys' cubic convolution kernel, a = -0.5 (Pillow's bicubic_filter, operation for operation).
double cubic(double x) {
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Pillow's precompute_coeffs for the bicubic filter: for output i the inputs first[i] ..
// first[i] + count[i] - 1 with the normalised weights weight[i * taps + t].
struct Coeffs {
  std::vector<int> first, count;
  std::vector<double> weight;
  int taps = 0;
};

Coeffs resize_coeffs(int n_in, int n_out) {
  const double scale = double(n_in) / double(n_out);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  const double ss = 1.0 / filterscale;
  Coeffs c;
  c.taps = int(std::ceil(support)) * 2 + 1;
  c.first.resize(size_t(n_out));
  c.count.resize(size_t(n_out));
  c.weight.assign(size_t(n_out) * size_t(c.taps), 0.0);
  for (int i = 0; i < n_out; ++i) {
    const double center = (i + 0.5) * scale;
    const int xmin = std::max(int(center - support + 0.5), 0);
    const int xmax = std::min(int(center + support + 0.5), n_in);
    double* k = &c.weight[size_t(i) * size_t(c.taps)];
    double total = 0.0;
    for (int x = 0; x < xmax - xmin; ++x) {
      k[x] = cubic((x + xmin - center + 0.5) * ss);
      total += k[x];
    }
    if (total != 0.0)
      for (int x = 0; x < xmax - xmin; ++x) k[x] /= total;
    c.first[size_t(i)] = xmin;
    c.count[size_t(i)] = std::max(xmax - xmin, 0);
  }
  return c;
}

// The upright image over the decoded pixels, without a copy: pixel (x, y) of the upright image (RGB
// first, then any fourth channel) is at px[origin + x * dx + y * dy].
struct View {
  const uint8_t* px;
  std::ptrdiff_t origin, dx, dy;
  int width, height;  // upright
  std::ptrdiff_t offset(int x, int y) const { return origin + std::ptrdiff_t(x) * dx + std::ptrdiff_t(y) * dy; }
};

// The upright view of a stored w x h image of `channels` interleaved channels, for EXIF orientation
// 1-8 (what runtime/images.py's orient and Pillow's ImageOps.exif_transpose do).
View upright(const uint8_t* px, int w, int h, int channels, int orientation) {
  const std::ptrdiff_t c = channels, row = std::ptrdiff_t(w) * c;
  const std::ptrdiff_t right = std::ptrdiff_t(w - 1) * c, bottom = std::ptrdiff_t(h - 1) * row;
  switch (orientation) {
    case 2: return {px, right, -c, row, w, h};             // mirrored left-right
    case 3: return {px, bottom + right, -c, -row, w, h};   // rotated 180 degrees
    case 4: return {px, bottom, c, -row, w, h};            // mirrored top-bottom
    case 5: return {px, 0, row, c, h, w};                  // transposed
    case 6: return {px, bottom, -row, c, h, w};            // stored turned 90 degrees counter-clockwise
    case 7: return {px, bottom + right, -row, -c, h, w};   // transversed
    case 8: return {px, right, row, -c, h, w};             // stored turned 90 degrees clockwise
    default: return {px, 0, c, row, w, h};
  }
}

// The s x s square at (left, top) of the upright image, resized to size x size, as float32
// v / 127.5 - 1 in [3][size][size].
FTensor crop_resize(const View& img, int left, int top, int s, int size) {
  FTensor out;
  out.shape = {3, size, size};
  out.data.resize(size_t(3) * size_t(size) * size_t(size));
  const size_t plane = size_t(size) * size_t(size);
  if (s == size) {
    for (int y = 0; y < s; ++y)
      for (int x = 0; x < s; ++x)
        for (int ch = 0; ch < 3; ++ch) {
          const double v = img.px[img.offset(left + x, top + y) + ch];
          out.data[size_t(ch) * plane + size_t(y) * size_t(size) + size_t(x)] = float(v / 127.5 - 1.0);
        }
    return out;
  }
  const Coeffs c = resize_coeffs(s, size);
  // horizontal pass: [s rows][size][3] float64
  std::vector<double> across(size_t(s) * size_t(size) * 3);
  for (int y = 0; y < s; ++y) {
    double* dst = &across[size_t(y) * size_t(size) * 3];
    for (int i = 0; i < size; ++i) {
      const double* k = &c.weight[size_t(i) * size_t(c.taps)];
      std::ptrdiff_t o = img.offset(left + c.first[size_t(i)], top + y);
      double a0 = 0.0, a1 = 0.0, a2 = 0.0;
      for (int t = 0; t < c.count[size_t(i)]; ++t, o += img.dx) {
        a0 += k[t] * double(img.px[o + 0]);
        a1 += k[t] * double(img.px[o + 1]);
        a2 += k[t] * double(img.px[o + 2]);
      }
      dst[3 * i + 0] = a0;
      dst[3 * i + 1] = a1;
      dst[3 * i + 2] = a2;
    }
  }
  // vertical pass
  for (int j = 0; j < size; ++j) {
    const double* k = &c.weight[size_t(j) * size_t(c.taps)];
    const size_t first = size_t(c.first[size_t(j)]);
    for (int i = 0; i < size; ++i) {
      double a[3] = {0.0, 0.0, 0.0};
      for (int t = 0; t < c.count[size_t(j)]; ++t) {
        const double* p = &across[((first + size_t(t)) * size_t(size) + size_t(i)) * 3];
        a[0] += k[t] * p[0];
        a[1] += k[t] * p[1];
        a[2] += k[t] * p[2];
      }
      for (int ch = 0; ch < 3; ++ch)
        out.data[size_t(ch) * plane + size_t(j) * size_t(size) + size_t(i)] = float(a[ch] / 127.5 - 1.0);
    }
  }
  return out;
}

}  // namespace

std::vector<std::string> list_photos(const std::string& dir_in) {
  const std::string dir = pathlib_str(dir_in);
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0)
    throw InputError("image folder " + py_repr(dir) + " does not exist; pass the folder of your photos with --images");
  if (!S_ISDIR(st.st_mode))
    throw InputError(py_repr(dir) + " is not a folder; pass the folder of your photos with --images");
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (!d)
    throw InputError("cannot list the image folder " + py_repr(dir) + ": " + std::strerror(errno) +
                     "; pass the folder of your photos with --images");
  while (dirent* e = ::readdir(d)) names.emplace_back(e->d_name);
  ::closedir(d);
  std::sort(names.begin(), names.end());  // byte order: Python's order of the names for UTF-8 names
  bool ok = false;
  const std::string root = real_path(dir, &ok);
  std::vector<std::string> files;
  for (const std::string& name : names) {
    if (name.empty() || name[0] == '.') continue;
    const std::string ext = suffix(name);
    const std::string path = path_join(dir, name);
    if (one_of(ext, kRefused, std::size(kRefused)))
      throw InputError(path + ": " + ext + " photos are not supported; convert it to PNG or JPEG (or remove it)");
    if (!one_of(ext, kSupported, std::size(kSupported))) continue;
    struct stat ls;
    if (::lstat(path.c_str(), &ls) == 0 && S_ISLNK(ls.st_mode)) {
      bool resolved = false;
      const std::string real = real_path(path, &resolved);
      if (!resolved) throw InputError(path + " is a broken link; copy the photo into the folder instead");
      if (!inside(real, root))
        throw InputError(path + " links outside the photo folder; copy the photo into the folder instead");
    }
    struct stat fs;
    if (::stat(path.c_str(), &fs) != 0 || !S_ISREG(fs.st_mode))
      throw InputError(path + " is not a file; remove it from the photo folder");
    files.push_back(path);
  }
  if (files.empty()) {
    std::string looked;
    for (const char* e : kSupported) looked += (looked.empty() ? "" : ", ") + std::string(e);
    throw InputError("no images in " + py_repr(dir) + " (looked for " + looked + "); add 3-10 photos of the subject");
  }
  return files;
}

FTensor load_photo(const std::string& path_in, int size) {
  if (size < 1) throw InputError("the photo size must be at least 1, got " + std::to_string(size));
  const std::string path = pathlib_str(path_in);
  const std::vector<uint8_t> data = read_all(path);
  const Header h = check(path, data);
  if (data.size() > size_t(INT_MAX)) throw InputError(cannot_read(path, "larger than 2 GiB"));
  int w = 0, ht = 0, comp = 0;
  if (!stbi_info_from_memory(data.data(), int(data.size()), &w, &ht, &comp))
    throw InputError(cannot_read(path, stbi_failure_reason()));
  if (w != h.width || ht != h.height)
    throw InputError(cannot_read(path, "decoded as " + std::to_string(w) + "x" + std::to_string(ht)));
  // 16-bit samples come as their high byte; with alpha (stb_image applies a PNG's tRNS), RGBA
  const int channels = h.alpha ? 4 : 3;
  std::unique_ptr<stbi_uc, decltype(&stbi_image_free)> px(
      stbi_load_from_memory(data.data(), int(data.size()), &w, &ht, &comp, channels), &stbi_image_free);
  if (!px) throw InputError(cannot_read(path, stbi_failure_reason()));
  if (h.alpha) {  // composited on white in place: round((c a + 255 (255 - a)) / 255), half up
    stbi_uc* p = px.get();
    for (size_t i = 0, n = size_t(w) * size_t(ht); i < n; ++i, p += 4) {
      const uint32_t a = p[3];
      for (int ch = 0; ch < 3; ++ch) p[ch] = stbi_uc((p[ch] * a + 255 * (255 - a) + 127) / 255);
    }
  }
  const View img = upright(px.get(), w, ht, channels, h.orientation);
  const int s = std::min(img.width, img.height);
  return crop_resize(img, (img.width - s) / 2, (img.height - s) / 2, s, size);
}

FTensor load_photos(const std::string& dir, int size, std::vector<std::string>* names) {
  const std::vector<std::string> files = list_photos(dir);
  FTensor all;
  all.shape = {int64_t(files.size()), 3, size, size};
  all.data.reserve(numel(all.shape));
  for (const std::string& f : files) {
    const FTensor one = load_photo(f, size);
    all.data.insert(all.data.end(), one.data.begin(), one.data.end());
    if (names) names->push_back(f.substr(f.rfind('/') + 1));
  }
  return all;
}

}  // namespace blockskip
