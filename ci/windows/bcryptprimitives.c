/* ProcessPrng for wine 8.0, whose bcryptprimitives.dll lacks it (current Rust std imports it).
 * Built by ci/windows.sh with mingw-w64 and copied into the wine prefix's system32.
 * Real Windows (10 and later) has its own; this file is for the wine test set-up only. */
#include <windows.h>
#include <bcrypt.h>

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG) != 0)
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
