@echo off
rem LoRA Studio launcher for Windows: double-click it.
rem The first start creates a Python environment in .venv and installs what the app needs.
setlocal
cd /d "%~dp0"
if not "%LORA_STUDIO_VENV%"=="" if exist "%LORA_STUDIO_VENV%\Scripts\python.exe" if not exist "%LORA_STUDIO_VENV%\.lora-studio-installed" (
  rem An environment you named and made yourself: used as it is, never installed into.
  "%LORA_STUDIO_VENV%\Scripts\python.exe" -c "import gradio, torch, diffusers, peft" 2>nul || goto :notready
  "%LORA_STUDIO_VENV%\Scripts\python.exe" launch.py %*
  goto :end
)
if "%LORA_STUDIO_VENV%"=="" set LORA_STUDIO_VENV=.venv
if not exist "%LORA_STUDIO_VENV%\Scripts\python.exe" (
  echo LoRA Studio: first start. Creating a Python environment in %LORA_STUDIO_VENV% ...
  py -3 -c "import sys; sys.exit(sys.version_info < (3, 11))" 2>nul && py -3 -m venv "%LORA_STUDIO_VENV%" 2>nul
  if errorlevel 1 python -c "import sys; sys.exit(sys.version_info < (3, 11))" && python -m venv "%LORA_STUDIO_VENV%"
  if errorlevel 1 goto :nopython
)
if not exist "%LORA_STUDIO_VENV%\.lora-studio-installed" (
  echo LoRA Studio: installing the packages it needs. This takes a few minutes the first time.
  where nvidia-smi >nul 2>nul && (
    echo NVIDIA GPU found: installing the CUDA build of torch first.
    "%LORA_STUDIO_VENV%\Scripts\python.exe" -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 || goto :notready
echo error: the environment LORA_STUDIO_VENV names lacks the app's packages; install requirements.txt into it, or clear LORA_STUDIO_VENV to let the app make its own in .venv.
goto :end
:failed
  )
  "%LORA_STUDIO_VENV%\Scripts\python.exe" -m pip install -r requirements.txt || goto :notready
echo error: the environment LORA_STUDIO_VENV names lacks the app's packages; install requirements.txt into it, or clear LORA_STUDIO_VENV to let the app make its own in .venv.
goto :end
:failed
  echo installed> "%LORA_STUDIO_VENV%\.lora-studio-installed"
)
"%LORA_STUDIO_VENV%\Scripts\python.exe" launch.py %*
goto :end
:nopython
echo error: Python 3.11 or newer was not found. Install it from https://www.python.org (tick "Add to PATH") and start again.
goto :end
:notready
echo error: the environment LORA_STUDIO_VENV names lacks the app's packages; install requirements.txt into it, or clear LORA_STUDIO_VENV to let the app make its own in .venv.
goto :end
:failed
echo error: installing the requirements failed (see above). Check your internet connection and disk space, then start again.
:end
pause
